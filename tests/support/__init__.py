"""What the tests share: dense float64 references (dense_reference), running work in
spawned ranks (spawned_ranks) and calling the CLI (cli_helpers). Test files import these
as ``from support.<module> import ...``; nothing here is a test."""
