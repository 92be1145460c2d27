"""What ``certify`` writes: ``certificate.json``, ``report.html`` and Model
Explorer node data per stage; and the export manifest's tensor names those
node data are keyed by (``--tflite``)."""

from __future__ import annotations

import json
from pathlib import Path

from refsd_validate.bundle import BundleError
from refsd_validate.certificate import Certificate
from refsd_validate.plan import one_line
from refsd_validate.report import model_explorer_node_data, render_report


def tflite_tensor_names(tflite_dir: str | Path) -> dict[str, dict[str, str]]:
    """Stage -> module path -> TFLite tensor name, from an export's ``refsd_export.json``."""
    from refsd.export.build import read_manifest  # noqa: PLC0415

    try:
        doc = read_manifest(tflite_dir)
        return {stage: {p: t["tensor"] for p, t in c["tensors"].items()} for stage, c in doc["components"].items()}
    except (OSError, ValueError) as e:
        raise BundleError(f"--tflite {tflite_dir}: {one_line(e)}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"--tflite {tflite_dir}: not an export manifest ({one_line(e)})") from None


def write_outputs(cert: Certificate, out: str | Path, tflite_names: dict | None = None) -> Path:
    """certificate.json, report.html and model_explorer/{stage}.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certificate.json").write_text(json.dumps(cert.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(render_report(cert), encoding="utf-8")
    me = out / "model_explorer"
    me.mkdir(exist_ok=True)
    for stage, doc in model_explorer_node_data(cert, tflite_names).items():
        (me / f"{stage}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out

