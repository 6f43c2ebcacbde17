"""Start one run of the compiled mtrec pipeline on a Kubeflow Pipelines API server.

The k8s CronJob `mtrec-daily` runs this in the mtrec image every day at 00:30 UTC with `--ds-offset-days -1`:
the run of day D+1 processes ds = D, whose data is complete at 00:00 UTC of D+1 (as under Airflow). Pass
`--ds` for a specific day (a manual rerun or a backfill, one run per day).

    python submit_run.py --host http://ml-pipeline.kubeflow:8888 --ds 2024-05-10 --retrain always
    python submit_run.py --host ... --start 2024-05-01 --end 2024-05-07 --retrain never   # backfill, in order
    python submit_run.py --ds 2024-05-10 --dry-run                                        # print the request

In-cluster credentials: the kfp client reads the projected service-account token at
/var/run/secrets/kubeflow/pipelines/token (audience pipelines.kubeflow.org), which the CronJob mounts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PACKAGE = HERE / "mtrec_pipeline.yaml"


def days_to_run(args: argparse.Namespace, today: dt.date) -> list[dt.date]:
    """The logical dates to submit: --ds, or --start..--end, or the trigger's UTC date plus --ds-offset-days."""
    if args.ds:
        return [dt.date.fromisoformat(args.ds)]
    if args.start or args.end:
        if not (args.start and args.end):
            raise SystemExit("error: --start and --end go together")
        start, end = dt.date.fromisoformat(args.start), dt.date.fromisoformat(args.end)
        if end < start:
            raise SystemExit("error: --end is before --start")
        return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    return [today + dt.timedelta(days=args.ds_offset_days)]


def requests_for(args: argparse.Namespace, today: dt.date) -> list[dict]:
    out = []
    for ds in days_to_run(args, today):
        arguments = {"ds": ds.isoformat(), "retrain": args.retrain}
        if args.scenario:
            arguments["scenarios"] = list(args.scenario)
        out.append({"pipeline_file": str(args.package), "arguments": arguments,
                    "run_name": f"mtrec-daily-{ds.isoformat()}-{secrets.token_hex(3)}",
                    "experiment_name": args.experiment, "namespace": args.namespace,
                    "service_account": args.service_account, "enable_caching": False})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="compiled pipeline YAML")
    ap.add_argument("--ds", help="logical date YYYY-MM-DD (UTC)")
    ap.add_argument("--start", help="first ds of a backfill (runs are submitted and awaited in order)")
    ap.add_argument("--end", help="last ds of a backfill, inclusive")
    ap.add_argument("--ds-offset-days", type=int, default=-1,
                    help="without --ds: ds = the UTC date of the trigger plus this offset (default -1: yesterday)")
    ap.add_argument("--retrain", choices=["auto", "always", "never"], default="auto")
    ap.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    ap.add_argument("--experiment", default="mtrec")
    ap.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    ap.add_argument("--service-account", default="mtrec-pipeline")
    ap.add_argument("--timeout", type=int, default=6 * 3600, help="seconds to wait for each run of a backfill")
    ap.add_argument("--dry-run", action="store_true", help="print the requests instead of submitting them")
    args = ap.parse_args(argv)
    if not args.package.exists():
        raise SystemExit(f"error: compiled pipeline {args.package} does not exist")
    # The trigger's calendar date (UTC) is the only use of the clock: it names the day to process.
    reqs = requests_for(args, dt.datetime.now(dt.UTC).date())
    if args.dry_run:
        print(json.dumps(reqs, indent=2))
        return 0
    if not args.host:
        raise SystemExit("error: --host is required (or use --dry-run)")
    import kfp

    client = kfp.Client(host=args.host, namespace=args.namespace)
    backfill = len(reqs) > 1
    for req in reqs:
        run = client.create_run_from_pipeline_package(**req)
        print(f"submitted {req['run_name']} (ds={req['arguments']['ds']}): run id {run.run_id}", flush=True)
        if backfill:  # one day at a time, in order: each day's scores depend on the champion as of that day
            done = client.wait_for_run_completion(run.run_id, timeout=args.timeout)
            state = str(getattr(done, "state", "")).upper()
            print(f"  {req['arguments']['ds']}: {state}", flush=True)
            if state not in ("SUCCEEDED", "RUNSTATE.SUCCEEDED"):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
