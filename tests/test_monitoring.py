"""infra/monitoring: the alert rules, scrape configs, Grafana dashboard and OpenTelemetry collector config are well
formed, and every metric they name is one the services really export (scraped from the session suite's /metrics
after a generation and a classification). The classifier's batcher series move with its own statistics.

promtool, Grafana and the collector binary are not available here, so the files are checked structurally: YAML/JSON
that parses, the fields each format requires, and names resolved against what the services serve.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from metrics_helpers import scrape

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "infra" / "monitoring"
RULES = MONITORING / "prometheus" / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "latentwire.json"
COLLECTOR = MONITORING / "otel" / "collector.yaml"

#: Suffixes a sample may add to its family's name, per metric type (Prometheus exposition format).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "unknown": ("",)}
#: Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
#: Component types of the OpenTelemetry Collector (core and contrib distributions) that these configs may use.
OTEL_TYPES = {
    "receivers": {"otlp", "prometheus", "hostmetrics", "jaeger", "zipkin", "filelog"},
    "processors": {"batch", "memory_limiter", "resource", "attributes", "filter", "k8sattributes",
                   "resourcedetection", "tail_sampling", "transform", "probabilistic_sampler"},
    "exporters": {"debug", "otlp", "otlphttp", "prometheus", "prometheusremotewrite", "file", "zipkin"},
    "extensions": {"health_check", "pprof", "zpages"},
    "connectors": {"spanmetrics", "forward", "count"},
}


def _rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"} and document["groups"]
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers followed by a selector, a range or an operator, minus
    functions, keywords and label names."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_selectors = re.sub(r"\{[^}]*\}", "{}", without_strings)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", without_selectors):
        word = match.group(1)
        before = without_selectors[:match.start()].rstrip()
        if before.endswith(("by (", "without (", "by(", "without(")) or re.search(r"\b(by|without)\s*\([^)]*$", before):
            continue  # a grouping label
        if word in {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool",
                    "offset", "le", "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk",
                    "bottomk", "quantile", "count_values", "group"}:  # aggregations written as `sum by (x) (...)`
            continue
        names.add(word)
    return names


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values()) and expr.count('"') % 2 == 0


def test_alert_rules_are_well_formed():
    rules = _rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names) and len(set(names)) == len(names), names
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip() and _balanced(rule["expr"]), rule["alert"]
        assert DURATION.match(str(rule["for"])), rule["alert"]
        assert rule["labels"].get("severity") in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
    # What the alerts must cover: queue depth, job failure rate, a stage down, step time p95.
    exprs = " ".join(rule["expr"] for rule in rules)
    assert "latentwire_queue_depth" in exprs
    assert 'latentwire_job_duration_seconds_count{outcome="failed"}' in exprs
    assert 'up{job="latentwire"} == 0' in exprs
    assert "histogram_quantile(0.95" in exprs and "latentwire_denoise_step_seconds_bucket" in exprs


def test_scrape_configs_match_the_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    # The default (plaintext) services; the tls profile's serve their metrics over mutual TLS, not scraped here.
    ports = {name: service["environment"]["LATENTWIRE_METRICS_PORT"] for name, service in compose.items()
             if "LATENTWIRE_METRICS_PORT" in (service.get("environment") or {}) and not service.get("profiles")}
    assert {"orchestrator", "text-encoder", "denoiser", "vae", "registry", "classifier", "controlnet"} <= set(ports)
    static = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    assert static["rule_files"] == ["/etc/prometheus/alerts.yml"]
    job = next(job for job in static["scrape_configs"] if job["job_name"] == "latentwire")
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    # Every service with a metrics port is scraped there, and nothing else is.
    assert targets == {f"{name}:{port}" for name, port in ports.items()}
    assert all(group["labels"]["component"] for group in job["static_configs"])
    kubernetes = yaml.safe_load((MONITORING / "prometheus" / "prometheus-k8s.yml").read_text())
    job = next(job for job in kubernetes["scrape_configs"] if job["job_name"] == "latentwire")
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert any(relabel.get("action") == "keep" and "part_of" in relabel["source_labels"][0]
               for relabel in job["relabel_configs"])
    # The compose metrics profile mounts the files this folder holds.
    for name in ("prometheus", "grafana", "otel-collector"):
        service = compose[name]
        assert service["profiles"] == ["metrics"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["targets"] and all(_balanced(t["expr"]) for t in panel["targets"]), panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(dashboard["panels"]))) - {"__rate_interval"}
    assert used <= variables, used - variables
    source = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboard["templating"]["list"][0]["current"]["value"]


def test_collector_config_names_only_known_components():
    config = yaml.safe_load(COLLECTOR.read_text())
    defined = {}
    for kind, known in OTEL_TYPES.items():
        for component in config.get(kind) or {}:
            kind_name = component.split("/")[0]
            assert kind_name in known, f"{kind}: unknown component type {kind_name!r}"
            defined.setdefault(kind, set()).add(component)
    service = config["service"]
    assert set(service.get("extensions", [])) <= defined.get("extensions", set())
    pipelines = service["pipelines"]
    assert {"traces", "metrics"} <= {name.split("/")[0] for name in pipelines}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            missing = set(pipeline.get(kind, [])) - defined.get(kind, set())
            assert not missing, f"pipeline {name} names undefined {kind}: {missing}"
        assert pipeline["receivers"] and pipeline["exporters"]
    assert "otlp" in pipelines["traces"]["receivers"] and "prometheus" in pipelines["metrics"]["exporters"]
    assert any(e.split("/")[0] in {"debug", "otlp", "otlphttp"} for e in pipelines["traces"]["exporters"])


# -- against the running suite ---------------------------------------------------------------------------------------


def _total(families: dict, family: str, sample: str, **labels) -> float:
    entry = families.get(family)
    return sum(s.value for s in (entry.samples if entry else []) if s.name == sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def scraped(suite):
    """Every service's families after a generation and a classification (before/after the classification too)."""
    from latentwire.client import Client
    from latentwire.client.classifier import ClassifierClient
    from services.tiny_models.mobilevit import synthetic_images

    assert all(service.metrics_address for service in suite.services.values()), "the suite runs with --metrics-port"
    with Client(suite.address, timeout=120) as client:
        client.generate("a lighthouse", seed=1, steps=2, guidance_scale=1.0)
    classifier = suite.services["classifier"]
    before = scrape(classifier.metrics_address)
    with ClassifierClient(classifier.address, timeout=60) as client:
        stats_before = {m.model: m for m in client.statistics().models}
        client.classify(synthetic_images(3), top_k=2)
        stats_after = {m.model: m for m in client.statistics().models}
    after = {name: scrape(service.metrics_address) for name, service in suite.services.items()}
    return before, after, stats_before, stats_after


def test_every_metric_the_rules_and_dashboard_use_is_exported(scraped):
    _, after, _, _ = scraped
    families = {}
    for per_service in after.values():
        families.update(per_service)
    exported = {name + suffix for name, family in families.items() for suffix in SUFFIXES[family.type]}
    used = set()
    for expr in [rule["expr"] for rule in _rules()] + _dashboard_exprs():
        used |= _metric_names(expr)
    assert used, "no metric names found"
    latentwire = {name for name in used if name.startswith("latentwire_")}
    assert len(latentwire) >= 10, latentwire
    missing = used - exported - SYNTHETIC
    assert not missing, f"named in infra/monitoring but not exported by any service: {sorted(missing)}"


def test_classifier_batcher_series_follow_its_statistics(scraped):
    before, after, stats_before, stats_after = scraped
    families = after["classifier"]

    def delta(family, sample, model):
        return _total(families, family, sample, model=model) - _total(before, family, sample, model=model)

    models = {s.labels["model"] for s in families["latentwire_classifier_batches"].samples}
    moved = [m for m in models if delta("latentwire_classifier_images", "latentwire_classifier_images_total", m)]
    assert len(moved) == 1, f"one model ran the call's images: {models}"
    model = moved[0]
    # The batcher's own statistics (GetStatistics) moved by the same amounts.
    stats = [(m.image_count - (stats_before[name].image_count if name in stats_before else 0),
              m.execution_count - (stats_before[name].execution_count if name in stats_before else 0))
             for name, m in stats_after.items()]
    stats = [s for s in stats if s[0]]
    assert len(stats) == 1 and stats[0][0] == 3, stats
    batches = delta("latentwire_classifier_batches", "latentwire_classifier_batches_total", model)
    assert delta("latentwire_classifier_images", "latentwire_classifier_images_total", model) == 3
    assert 1 <= batches <= 3 and batches == stats[0][1]
    assert delta("latentwire_classifier_batch_size", "latentwire_classifier_batch_size_count", model) == batches
    assert delta("latentwire_classifier_batch_size", "latentwire_classifier_batch_size_sum", model) == 3
    assert delta("latentwire_classifier_queue_wait_seconds", "latentwire_classifier_queue_wait_seconds_count",
                 model) == 3
    assert 0 <= delta("latentwire_classifier_queue_wait_seconds", "latentwire_classifier_queue_wait_seconds_sum",
                      model) < 30
    assert 0 < delta("latentwire_classifier_batch_compute_seconds", "latentwire_classifier_batch_compute_seconds_sum",
                     model) < 60
    assert _total(families, "latentwire_classifier_queued_images", "latentwire_classifier_queued_images",
                  model=model) == 0
    assert "latentwire_classifier_requests_rejected" in families  # declared (a sample appears on the first refusal)
