"""Entry point: python -m services.orchestrator --text-encoder-address H:P --denoiser-address H:P --vae-address H:P."""
from services.runtime.server import run

from .config import build_parser, check_addresses
from .servicer import OrchestratorService


def main(argv=None) -> None:
    parser = build_parser()

    def factory(config):
        check_addresses(parser, config.extra)
        return OrchestratorService(config)

    run(factory, parser, argv, needs_model=False)


if __name__ == "__main__":
    main()
