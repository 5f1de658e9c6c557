"""Security shared by the gRPC port and the metrics endpoint, with no gRPC
import: bearer tokens and the tokens file (``tokens``), HTTP basic auth and
its users (``basic_auth``), certificate pairs (``certificates``), the one
reloader of files that change without a restart (``reload``), and the
secrets folder of a deployment (``secrets``, ``lossd secrets init``). The
gRPC interceptor that checks tokens, and the gRPC server credentials, stay
in ``lossd_server.grpc`` (``auth``, ``tls``)."""
