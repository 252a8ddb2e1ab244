"""The one scoring API (vaeanomaly/scoring.py): a request checked in one place, as the command line, cohort
scoring and the warm worker use it."""
from __future__ import annotations

import json

import pytest

from vaeanomaly.checkpoint import load_checkpoint
from vaeanomaly.predictors import PredictorOptions
from vaeanomaly.scoring import ScoreRequest, check_options
from vaeanomaly.score_worker import serve


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
    ck = load_checkpoint(None)
    with pytest.raises(ValueError, match="progress"):
        ScoreRequest("x.nrrd", progress="fancy").checked(ck)
    assert ScoreRequest("x.nrrd").checked(ck) == ["rec-grad"]  # the default of the model's kind
    assert ScoreRequest("x.nrrd", predictors="rec-grad,reconstruction").checked(ck) == ["rec-grad", "reconstruction"]


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
