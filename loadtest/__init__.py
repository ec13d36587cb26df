"""HTTP load generator for deltaserve and any OpenAI-compatible server, and its reports.

    python -m loadtest --url http://127.0.0.1:8000 --key KEY_A --key KEY_B --model ft-a --model ft-b \\
        --requests 200 --concurrency 16 --max-tokens 64 --json report.json

`runner` sends the requests (asyncio + httpx, bounded in count, concurrency and time) and measures each one;
`report` aggregates them (status and error counts, throughput, TTFT / inter-token / end-to-end percentiles,
per-model breakdown) into a text table and a JSON report that never contains an API key. No torch import.
"""

from loadtest.report import aggregate, build_report, percentile, render_text, summarize, to_json
from loadtest.runner import LoadConfig, Prompt, RequestResult, RunResult, Target, pair_targets, run_load

__all__ = [
    "LoadConfig", "Prompt", "RequestResult", "RunResult", "Target", "aggregate", "build_report", "pair_targets",
    "percentile", "render_text", "run_load", "summarize", "to_json",
]
