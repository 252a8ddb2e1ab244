"""The one scoring API (vaeanomaly/scoring.py): a request checked in one place, and one function that computes
the maps and the verdict (score_prepared), as the command line, cohort scoring, the warm worker and the module's
Logic use it."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from conftest import make_phantom
from vaeanomaly import scoring
from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint
from vaeanomaly.cli import main as cli
from vaeanomaly.registry import DEFAULT_PREDICTORS
from vaeanomaly.predictors import PredictorOptions
from vaeanomaly.scoring import ScoreRequest, check_options
from vaeanomaly.score_worker import ModelCache, score, serve


def test_request_round_trips_through_json():
    r = ScoreRequest(input="in.nrrd", output="out", mask="m.nrrd", model="bvae-l64-b10", predictors="rec-grad,kl-grad",
                     options=PredictorOptions(smooth=False, batch_size=7), report="r.json", device="cpu",
                     progress="lines")
    back = ScoreRequest.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r and back.options == PredictorOptions(smooth=False, batch_size=7)


def test_request_is_checked_with_messages_that_say_what_is_known():
    with pytest.raises(ValueError, match="unknown scoring request field.*argv.*known: input"):
        ScoreRequest.from_json({"input": "x.nrrd", "argv": ["score"]})
    with pytest.raises(ValueError, match="unknown option.*smooth_sigmaa"):
        ScoreRequest.from_json({"input": "x.nrrd", "options": {"smooth_sigmaa": 2}})
    with pytest.raises(ValueError, match="at least 'input'"):
        ScoreRequest.from_json({"output": "x"})
    with pytest.raises(ValueError, match="proj-steps.*batch-size"):
        check_options(PredictorOptions(proj_steps=-1, batch_size=0))
    with pytest.raises(ValueError, match="normalise must be one of none, median"):  # a request's JSON options too
        check_options(PredictorOptions(normalise="mean"))
    ck = load_checkpoint(DEFAULT_VAE)
    with pytest.raises(ValueError, match="progress"):
        ScoreRequest("x.nrrd", progress="fancy").checked(ck)
    assert ScoreRequest("x.nrrd").checked(ck) == ["rec-grad"]  # the default of the model's kind
    assert ScoreRequest("x.nrrd", predictors="rec-grad,reconstruction").checked(ck) == ["rec-grad", "reconstruction"]
    assert ScoreRequest("x.nrrd").checked(load_checkpoint("dae-64")) == ["dae-residual"]
    with pytest.raises(ValueError, match="rec-grad: not computed by a denoising autoencoder"):
        ScoreRequest("x.nrrd", predictors="rec-grad").checked(load_checkpoint("dae-64"))


def test_worker_answers_a_bad_request_with_the_command_lines_exit_code(tmp_path):
    """The warm worker's loop (in this process): a request that is not a valid ScoreRequest ends with exit code 2
    and one line saying why; the worker goes on to the next request."""
    sent = []
    lines = [json.dumps({"id": 1, "request": {"input": "x.nrrd", "bogus": 1}}),
             json.dumps({"id": 2, "request": {"input": str(tmp_path / "missing.nrrd"), "output": str(tmp_path / "o")}}),
             json.dumps({"quit": True})]
    serve(lines, sent.append)
    done = {e["id"]: e for e in sent if "done" in e}
    said = {e["id"]: e["line"] for e in sent if "line" in e}
    assert done[1]["done"] == 2 and "unknown scoring request field(s) bogus" in said[1]
    assert done[2]["done"] == 2 and "missing.nrrd" in said[2]
    assert done[1]["error"] == "ValueError" and done[1]["mask_source"] is None  # the failure's kind, for the panel


def test_worker_says_where_the_mask_came_from_and_which_refusal_it_was(tmp_path):
    """The warm worker's events name the brain mask's source (the maps event and the end) and write the mask to
    mask_out; a head it may not extract ends with error 'NotSkullStrippedError' (the panel offers the install)."""
    from vaeanomaly.synth import make_varied
    sitk.WriteImage(make_phantom((48, 52, 14), (3.0, 3.0, 6.0), blob_index=(20, 24, 7)), str(tmp_path / "a.nrrd"))
    head = make_varied(1_900_001, "tse", "glioma", head=True, step=2, off=("partial",))
    sitk.WriteImage(head.t2, str(tmp_path / "head.nrrd"))
    sent = []
    reqs = [ScoreRequest(str(tmp_path / "a.nrrd"), output=str(tmp_path / "o1"), mask_out=str(tmp_path / "m1.nrrd")),
            ScoreRequest(str(tmp_path / "head.nrrd"), output=str(tmp_path / "o2"), brain_extraction="off",
                         mask_out=str(tmp_path / "m2.nrrd"))]
    serve([json.dumps({"id": i + 1, "request": r.to_json()}) for i, r in enumerate(reqs)], sent.append)
    done = {e["id"]: e for e in sent if "done" in e}
    maps = {e["id"]: e for e in sent if "maps" in e}
    assert done[1]["done"] == 0 and done[1]["error"] is None and done[1]["mask_source"] == "automatic"
    assert maps[1]["mask_source"] == "automatic" and (tmp_path / "m1.nrrd").is_file()
    assert done[2]["done"] == 2 and done[2]["error"] == "NotSkullStrippedError" and 2 not in maps
    assert not (tmp_path / "m2.nrrd").exists()


def spy_on_score_prepared(monkeypatch) -> list:
    """Every call of scoring.score_prepared from now on, as its `verdict` flag (the real function still runs)."""
    calls, real = [], scoring.score_prepared

    def spy(*args, **kwargs):
        calls.append(kwargs.get("verdict", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_prepared", spy)
    return calls


def test_the_command_line_and_the_worker_score_through_score_prepared(tmp_path, monkeypatch):
    """`vaeanomaly score` for one volume (with and without a report) and a warm worker's request compute their maps
    with scoring.score_prepared: the verdict's part only when a report is asked for."""
    sitk.WriteImage(make_phantom((48, 52, 14), (3.0, 3.0, 6.0), blob_index=(20, 24, 7)), str(tmp_path / "a.nrrd"))
    calls = spy_on_score_prepared(monkeypatch)
    assert cli(["score", str(tmp_path / "a.nrrd"), "-o", str(tmp_path / "h.nii.gz"), "--progress", "none"]) == 0
    assert calls == [False]
    assert cli(["score", str(tmp_path / "a.nrrd"), "-o", str(tmp_path / "h.nii.gz"), "--progress", "none",
                "--report", str(tmp_path / "r.json")]) == 0
    assert calls == [False, True] and (tmp_path / "r.json").is_file()
    score(ScoreRequest(str(tmp_path / "a.nrrd"), output=str(tmp_path / "w")).to_json(), ModelCache())
    pred = DEFAULT_PREDICTORS[load_checkpoint(None).kind]  # the default model's own map
    assert calls == [False, True, False] and (tmp_path / "w" / f"{pred}.nrrd").is_file()


def test_logic_process_runs_a_request_as_the_worker_does(scene, monkeypatch):
    """The module's in-process Logic.process builds a ScoreRequest and runs it with scoring.run (as the warm
    worker does), passing its progress and cancel callbacks through."""
    pytest.importorskip("slicer")
    from test_logic import add_volume
    from vaeanomaly.predictors import Cancelled
    from VAEAnomalyLib.logic import VAEAnomalyLogic
    seen, real = [], scoring.run

    def spy(request, *args, **kwargs):
        seen.append(request)
        return real(request, *args, **kwargs)

    monkeypatch.setattr(scoring, "run", spy)
    calls = spy_on_score_prepared(monkeypatch)
    node = add_volume(scene, make_phantom((48, 52, 14), (3.0, 3.0, 6.0), blob_index=(20, 24, 7)))
    logic, fractions = VAEAnomalyLogic(scene), []
    heat = logic.process(node, None, DEFAULT_VAE, "rec-grad", options=PredictorOptions(batch_size=5), reconstruction=True,
                         progress=fractions.append)
    assert heat is not None and logic.lastReconstruction is not None and fractions[-1] == pytest.approx(1.0)
    assert calls == [False] and len(seen) == 1 and isinstance(seen[0], ScoreRequest)
    assert seen[0].predictors == "rec-grad,reconstruction" and seen[0].options == PredictorOptions(batch_size=5)
    assert seen[0].report is None
    with pytest.raises(Cancelled):
        logic.process(node, None, DEFAULT_VAE, "rec-grad", cancel=lambda: True)
