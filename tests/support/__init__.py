"""What the tests share: dense float64 references (dense_reference), running work in
spawned ranks (spawned_ranks), calling the CLI (cli_helpers) and training a run in the
test process (training). Test files import these as ``from support.<module> import ...``;
nothing here is a test."""
