"""One error hierarchy: client and server errors have distinct roots, each error knows its status."""

import pickle

import pytest

from cluster.errors import GroupDrainingError, GroupFailedError, PlacementError
from gptoss.errors import (
    CheckpointError,
    ClientError,
    DeadlineExceededError,
    GptossError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServerError,
    UnavailableError,
    VocabularyError,
)
from parallel.comm import CommunicatorError

SERVER_FAULTS = [CheckpointError("x"), VocabularyError("x"), GroupFailedError("x"), GroupDrainingError("x"),
                 PlacementError("x"), CommunicatorError("x", rank=0, op="all_to_all")]


@pytest.mark.parametrize("error", SERVER_FAULTS, ids=lambda e: type(e).__name__)
def test_server_faults_are_never_client_errors(error):
    # A mapper keyed on ValueError (or ClientError) must not turn a broken checkpoint into a 400.
    assert isinstance(error, ServerError) and not isinstance(error, ClientError | ValueError)
    assert error.http_status >= 500


@pytest.mark.parametrize(("error", "http", "grpc"), [
    (InvalidRequestError("temperature", "temperature must be >= 0, got -1"), 400, "INVALID_ARGUMENT"),
    (NotFoundError("model 'x' is not served here", "model"), 404, "NOT_FOUND"),
    (OverloadedError("queue full", retry_after_s=2.0), 429, "RESOURCE_EXHAUSTED"),
    (GroupFailedError("rank 1 died"), 503, "UNAVAILABLE"),
    (GroupDrainingError("draining"), 503, "UNAVAILABLE"),
    (DeadlineExceededError("past the deadline"), 504, "DEADLINE_EXCEEDED"),
    (CheckpointError("bad shard"), 500, "INTERNAL"),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_each_error_knows_its_http_status_and_grpc_code(error, http, grpc):
    assert isinstance(error, GptossError)
    assert (error.http_status, error.grpc_code) == (http, grpc)


def test_client_errors_name_the_parameter_and_survive_pickling():
    # Errors cross Ray actors and Serve replicas pickled: the parameter name must come along.
    error = pickle.loads(pickle.dumps(InvalidRequestError("top_p", "top_p must be in (0, 1], got 2")))
    assert error.param == "top_p" and str(error) == "top_p must be in (0, 1], got 2"
    overloaded = pickle.loads(pickle.dumps(OverloadedError("full", retry_after_s=3.0)))
    assert overloaded.retry_after_s == 3.0 and isinstance(overloaded, UnavailableError)
