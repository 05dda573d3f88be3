"""Entry point: python -m services.vae --model PATH [--port N]."""
from services.runtime.server import run

from .config import build_parser
from .servicer import VaeService


def main(argv=None) -> None:
    run(VaeService, build_parser(), argv)


if __name__ == "__main__":
    main()
