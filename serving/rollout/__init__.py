"""Model version rollouts: deploy, canary, gated promotion, rollback, drain."""
