"""`latentwire jobs ...`: the orchestrator's jobs (queued, running, finished).

    latentwire jobs list [--state queued|running|succeeded|failed|cancelled] [--page-size N]
    latentwire jobs show JOB_ID [-o out.png]      state, progress, and the images once it succeeded
    latentwire jobs watch JOB_ID [-o out.png]     re-attach to a job's progress until its result
    latentwire jobs cancel JOB_ID
"""
from __future__ import annotations

import argparse
from pathlib import Path

_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def _connection(args: argparse.Namespace) -> dict:
    from .connection import client_kwargs

    return client_kwargs(args)


def _state_name(value: int) -> str:
    from latentwire.common.v1 import status_pb2

    return status_pb2.JobState.Name(value).removeprefix("JOB_STATE_").lower()


def _line(job) -> str:
    progress = f"{job.completed_steps}/{job.total_steps}" if job.total_steps else "-"
    where = f"queue #{job.queue_position}" if job.queue_position else progress
    return f"{job.job_id}  {_state_name(job.state):<9}  {where:<10}  prio {job.priority:<4}  {job.prompt[:50]}"


def _write_images(result, output: str) -> None:
    out = Path(output)
    for index, image in enumerate(result.images):
        path = out if index == 0 else out.with_name(f"{out.stem}-{index}{out.suffix}")
        path.write_bytes(image.png)
        print(f"wrote {path}")


def cmd_list(args: argparse.Namespace) -> int:
    from latentwire.client import Client
    from latentwire.common.v1 import status_pb2

    state = status_pb2.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else 0
    with Client(args.server, timeout=30, **_connection(args)) as client:
        page = client.list_jobs(page_size=args.page_size, state=state)
    for job in page.jobs:
        print(_line(job))
    if page.next_page_token:
        print(f"(more: next page token {page.next_page_token})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from latentwire.client import Client

    with Client(args.server, timeout=30, **_connection(args)) as client:
        job = client.get_job(args.job_id)
    print(_line(job))
    if job.error.message:
        print(f"error: {job.error.message} ({job.error.reason})")
    if job.result.images and args.output:
        _write_images(job.result, args.output)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from latentwire.client import Client

    from .progress import ProgressBar

    bar = ProgressBar()
    # Ctrl-C ends the watch, not the job (run() says so).
    args.interrupted = f"stopped watching; job {args.job_id} goes on (`latentwire jobs cancel {args.job_id}` stops it)"
    with Client(args.server, timeout=None, **_connection(args)) as client:
        for event in client.watch_job(args.job_id):
            bar(event)
            if event.WhichOneof("event") == "result":
                _write_images(event.result, args.output)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from latentwire.client import Client

    with Client(args.server, timeout=60, **_connection(args)) as client:
        print(_line(client.cancel_job(args.job_id)))
    return 0


def add_commands(sub) -> None:
    """Register `latentwire jobs ...` on the top-level subparsers."""
    jobs = sub.add_parser("jobs", help="list, show, watch and cancel the orchestrator's jobs").add_subparsers(
        dest="jobs_command", required=True)
    p = jobs.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", choices=_STATES, default=None, help="only jobs in this state")
    p.add_argument("--page-size", type=int, default=50)
    p.set_defaults(func=cmd_list)
    p = jobs.add_parser("show", help="one job's state and progress; -o writes its images once it succeeded")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default=None)
    p.set_defaults(func=cmd_show)
    p = jobs.add_parser("watch", help="re-attach to a job's progress until its result")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_watch)
    p = jobs.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)
    from .connection import SERVER_HELP, add_flags

    for parser in (jobs.choices[name] for name in ("list", "show", "watch", "cancel")):
        parser.add_argument("--server", default=None, help=SERVER_HELP)
        add_flags(parser)
