"""What users touch: the CLI, the app, the demo, figures, loading and converting models, the hub."""
