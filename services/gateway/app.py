"""The gateway's ASGI app: AUTOMATIC1111's /sdapi/v1 API (routes.py) and the web page (web.py) over the suite.

``create_app(settings)`` builds it; uvicorn serves it (__main__.py). The lifespan opens the gRPC channels
(``app.state.suite``, a clients.SuiteClients) inside uvicorn's event loop and closes them at shutdown.
"""
from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.runtime.errors import LatentwireError

from . import routes
from .clients import SuiteClients
from .config import GatewaySettings
from .errors import SuiteCallError, http_status
from .progress import ProgressTracker

log = logging.getLogger(__name__)

#: Options GET /sdapi/v1/options answers before any POST (A1111's names and defaults).
DEFAULT_OPTIONS = {"sd_model_checkpoint": "", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                   "sd_vae": "Automatic", "eta_noise_seed_delta": 0, "live_previews_enable": True}


def create_app(settings: GatewaySettings, *, on_started=None) -> FastAPI:
    """The gateway app on ``settings``; ``on_started()`` runs once the suite's channels are open."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.suite = SuiteClients(settings)
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await app.state.suite.close()

    app = FastAPI(title="latentwire gateway", version="1",
                  description="AUTOMATIC1111's /sdapi/v1 API over the latentwire suite (docs/gateway.md).",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.progress = ProgressTracker()
    app.state.options = {**DEFAULT_OPTIONS, "sd_model_checkpoint": settings.models[0] if settings.models else ""}

    @app.exception_handler(SuiteCallError)
    async def suite_error(request: Request, error: SuiteCallError):
        return JSONResponse(status_code=http_status(error.code), content=error.body(), headers=error.headers())

    @app.exception_handler(LatentwireError)
    async def domain_error(request: Request, error: LatentwireError):
        return routes.error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        # FastAPI's own 422 body ({"detail": [{loc, msg, type}]}, as A1111's), with the reason the suite uses.
        errors = [{k: v for k, v in item.items() if k in ("loc", "msg", "type")} for item in error.errors()]
        return JSONResponse(status_code=422, content={"error": "INVALID_ARGUMENT", "detail": errors,
                                                      "reason": "INVALID_REQUEST_BODY"})

    app.include_router(routes.router)
    from services.gateway import krita  # auto-sd-paint-ext's /sdapi/interpause routes (its Krita plugin)

    app.include_router(krita.router)
    try:
        from services.gateway import web
    except ModuleNotFoundError as error:  # the web page's module is not in this tree (yet)
        if error.name != "services.gateway.web":
            raise
    else:
        app.include_router(web.router)
    return app
