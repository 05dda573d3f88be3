"""Entry point: python -m services.orchestrator --text-encoder-address H:P --denoiser-address H:P --vae-address H:P."""
from services.runtime.server import run

from .config import build_parser, settings_from_flags
from .servicer import OrchestratorService


def main(argv=None) -> None:
    parser = build_parser()

    def factory(config):
        # Refuse to start, with the flag to fix, without every stage's replicas or with a nonsensical limit.
        try:
            settings = settings_from_flags(config.extra)
        except ValueError as error:
            parser.error(str(error))
        return OrchestratorService(config, settings)

    run(factory, parser, argv, needs_model=False)


if __name__ == "__main__":
    main()
