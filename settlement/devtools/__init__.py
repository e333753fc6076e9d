"""Tools for devnets and tests (a local anvil, demo traffic, the simulator). Nothing at runtime imports them;
the CLI's `devnet`, `demo` and `simulate` commands do."""
