"""The job path: request -> queue -> executor -> engine."""
