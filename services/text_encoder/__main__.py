"""Entry point: python -m services.text_encoder --model PATH [--port N] [--encoders text_encoder,text_encoder_2,...]."""
from services.runtime.server import run

from .config import build_parser
from .servicer import TextEncoderService


def main(argv=None) -> None:
    run(TextEncoderService, build_parser(), argv)


if __name__ == "__main__":
    main()
