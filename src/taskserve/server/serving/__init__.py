"""The model-serving room: the model manager (loading, readiness, swaps, unloading), the
loaded versions it serves with their leases, and the one factory that builds a version on
the dynamic batcher or on the generation engine. It sits between the front ends and the
scheduling room, beside the tasks (neither imports the other: the front end wires the
tasks' checks into the manager); the repository room below it reads the files."""
