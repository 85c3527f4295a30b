"""The real-data benchmark: tasks, metrics, methods, runner, report and the bench command."""
