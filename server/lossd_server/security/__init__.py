"""Security shared by the gRPC port and the metrics endpoint, with no gRPC
import: bearer tokens (``tokens``), HTTP basic auth and its users
(``basic_auth``), files that reload without a restart (``reload``), and the
secrets folder of a deployment (``secrets``). The gRPC interceptor that
checks tokens, and the gRPC server credentials, stay in ``lossd_server.grpc``."""
