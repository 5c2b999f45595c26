"""The service layer that the API, the CLI, the workers and the demo share."""
