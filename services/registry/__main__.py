"""Entry point: python -m services.registry [--data-dir DIR] [--port N]."""
from services.runtime.server import run

from .config import build_parser, check_config
from .servicer import RegistryService


def main(argv=None) -> None:
    parser = build_parser()

    def factory(config):
        check_config(parser, config.extra)
        return RegistryService(config)

    run(factory, parser, argv, needs_model=False)


if __name__ == "__main__":
    main()
