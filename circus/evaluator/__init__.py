"""circus-evaluator: jobset evaluations (Celery beat + eval workers)."""
