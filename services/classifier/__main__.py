"""Entry point: python -m services.classifier --model PATH [--backend torch|int8|onnx|onnx-int8|tflite] [--port N]."""
from services.runtime.server import run

from .config import build_parser
from .servicer import ClassifierService


def main(argv=None) -> None:
    run(ClassifierService, build_parser(), argv)


if __name__ == "__main__":
    main()
