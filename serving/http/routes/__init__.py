"""HTTP routers, one per resource; thin: validate, then hand to ``serving.core.proxy``."""
