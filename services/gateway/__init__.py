"""The REST gateway: AUTOMATIC1111's /sdapi/v1 API (and the web page) over the suite's gRPC services."""
