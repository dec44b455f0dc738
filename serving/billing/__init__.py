"""Money: prices per model version, budgets per key and team, and what a request cost."""
