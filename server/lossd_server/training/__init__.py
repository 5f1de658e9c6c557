"""Training jobs: model presets, datasets, the job store, the per-job worker
process and the manager that queues, runs, resumes and watches jobs.

Only ``servicer`` imports gRPC; the rest is core and can be tested without a
network. ``store`` and ``datasets`` import no TensorFlow; ``worker`` imports
it only inside the job process.

Entry points: ``lossd_server.training.manager.TrainingManager`` and
``lossd_server.grpc.training_servicer.add_training_service``.
"""
