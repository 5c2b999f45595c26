"""Model versions, adapters and galleries as records: the ORM schema, the MLflow model
registry (source of truth for versions and aliases) and encoders for a version."""
