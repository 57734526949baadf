"""The `tributary` command. The only module allowed to import every package,
and it does so lazily: `tributary client` never loads server code."""
