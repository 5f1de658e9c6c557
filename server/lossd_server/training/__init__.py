"""Training jobs, grouped by what each module owns:

- ``manager``: the one object the servicer and the server hold; builds the
  parts below, starts and stops them.
- ``jobs``: checking a JobSpec and storing the job; finding a job.
- ``scheduler``: running each job in its own process, supervising, cancelling,
  resuming after a restart, and streaming a job's events.
- ``catalog``: the datasets jobs train on, and uploads; ``datasets`` parses
  and checks their content.
- ``artifacts``: job folders and the files clients download.
- ``inference``: Predict and Generate with trained models.
- ``losses``: the training checks on a planned loss, and ``PlanLoss``.
- ``models``: model presets and optimizers; ``worker``: what runs inside a
  job's process.

Jobs, events and datasets are stored by ``lossd_server.state``.

Nothing here imports gRPC (the servicer is ``lossd_server.grpc.training_servicer``).
TensorFlow is imported only by ``worker`` (inside the job process) and
``inference``, through Keras.
"""
