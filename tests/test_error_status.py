"""Errors are domain errors: the stable code is part of the class, the HTTP status belongs to the server.

The statuses below are the ones each class carried before the table moved into ``skr/server.py``; a class
added without a row here fails :func:`test_every_error_class_has_its_status_pinned`.
"""

from __future__ import annotations

import grpc
import pytest

from skr import errors
from skr.audit.checkpoint import AuditRateLimited
from skr.encfs import errors as encfs_errors
from skr.keyprovider.grpc_server import status_code
from skr.local.identity import InvalidAccessToken
from skr.local.keystore import KeyRejected
from skr.server import http_status

pytestmark = pytest.mark.unit

STATUS: dict[type[errors.SkrError], int] = {
    errors.SkrError: 500,
    errors.BadRequest: 400,
    errors.PayloadTooLarge: 413,
    errors.UnwrapFailed: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.EndpointNotAllowed: 403,
    errors.RemoteClientRefused: 403,
    errors.ForbiddenHost: 403,
    errors.ForbiddenOrigin: 403,
    errors.ReleaseDenied: 403,
    errors.NotFound: 404,
    errors.KeyNotFound: 404,
    errors.ReportError: 400,
    errors.VerificationError: 502,
    errors.CertificateError: 502,
    errors.ReportVerificationError: 502,
    errors.ValidationError: 502,
    errors.TokenError: 502,
    errors.JwsError: 502,
    errors.KeyWrapError: 502,
    errors.PolicyError: 400,
    errors.ConfigError: 500,
    errors.EvidenceUnavailable: 503,
    errors.CollateralError: 503,
    errors.UpstreamError: 502,
    errors.AttestationFailed: 502,
    errors.IdentityError: 502,
    errors.UpstreamTimeout: 504,
    errors.AuditError: 500,
    AuditRateLimited: 429,
    KeyRejected: 400,
    InvalidAccessToken: 401,
    encfs_errors.EncfsConfigError: 500,
    encfs_errors.EncfsKeyError: 400,
    encfs_errors.LuksError: 400,
    encfs_errors.LuksUnsupported: 400,
    encfs_errors.LuksWrongKey: 403,
    encfs_errors.BlobError: 502,
    encfs_errors.BlobLeased: 403,
    encfs_errors.MountError: 500,
}

GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _all_subclasses(cls: type[errors.SkrError]) -> set[type[errors.SkrError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _all_subclasses(sub)
    return found


@pytest.mark.parametrize("cls", STATUS, ids=lambda cls: cls.__name__)
def test_the_server_answers_each_error_class_with_its_status(cls: type[errors.SkrError]) -> None:
    assert http_status(cls("x")) == STATUS[cls]


@pytest.mark.parametrize("cls", STATUS, ids=lambda cls: cls.__name__)
def test_the_grpc_server_maps_each_error_class_as_its_http_status_did(cls: type[errors.SkrError]) -> None:
    assert status_code(cls("x")) == GRPC.get(STATUS[cls], grpc.StatusCode.INTERNAL)


def test_every_error_class_has_its_status_pinned() -> None:
    unpinned = {cls for cls in _all_subclasses(errors.SkrError) if cls.__module__.startswith("skr.")} - set(
        STATUS
    )
    assert not unpinned, sorted(cls.__name__ for cls in unpinned)


def test_error_classes_know_no_http() -> None:
    assert not [cls.__name__ for cls in _all_subclasses(errors.SkrError) if "status" in vars(cls)]


def test_the_code_is_an_enum_member_that_serializes_as_its_value() -> None:
    exc = errors.BadRequest("no kid", code=errors.Code.MISSING_FIELD)
    assert exc.code is errors.Code.MISSING_FIELD
    assert (
        f"{exc.code}" == "missing_field" and repr(exc) == "BadRequest(code='missing_field', message='no kid')"
    )
    assert errors.ReleaseDenied("x").code is errors.Code.RELEASE_DENIED
