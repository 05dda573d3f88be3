"""Entry point: python -m services.controlnet --model PATH [--port N]."""
from services.runtime.server import run

from .config import build_parser
from .servicer import ControlNetService


def main(argv=None) -> None:
    run(ControlNetService, build_parser(), argv)


if __name__ == "__main__":
    main()
