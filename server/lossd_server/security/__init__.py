"""Security helpers shared by the gRPC port and the metrics endpoint: change
detection for files that reload without a restart (``reload``)."""
