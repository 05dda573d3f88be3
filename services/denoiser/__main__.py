"""Entry point: python -m services.denoiser --model PATH [--port N]."""
from services.runtime.server import run

from .config import build_parser
from .servicer import DenoiserService


def main(argv=None) -> None:
    run(DenoiserService, build_parser(), argv)


if __name__ == "__main__":
    main()
