"""The Kubernetes operator: Alliance, Member and TrainingRun reconciled by kopf."""
