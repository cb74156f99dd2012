"""The ocicrypt key-provider JSON, the Go sidecar's annotation packet, RSA-OAEP-SHA256 and ``skr wrap``.

Request shapes are the ones recorded from skopeo 1.13.3 in shared/reference/KEYPROVIDER.md; expected
ciphertexts are checked by decrypting with ``cryptography`` directly, never with skr's own unwrap.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from skr.cli import main
from skr.errors import BadRequest, NotFound
from skr.keyprovider import algorithms, ocicrypt
from skr.keyprovider.keyinfo import read_key_info, wrap_for_keypath, write_key_info
from skr.keyprovider.provider import unwrap_packet, wrap_key_locally
from skr.server import http_status

OAEP256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
OAEP1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)

# skopeo 1.13.3 (KEYPROVIDER.md §2): `--encryption-key provider:myprov:anything`, `--decryption-key
# provider:myprov:x`; the long values are completed here with real base64 of the same kind.
OPTSDATA = b'{"symkey":"c2VjcmV0LXN5bWtleS0zMi1ieXRlcy1sb25nISE=","digest":"sha256:00","cipheroptions":{}}'
SKOPEO_WRAP = (
    b'{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"myprov":["YW55dGhpbmc="]},"DecryptConfig":'
    b'{"Parameters":{}}},"optsdata":"' + base64.b64encode(OPTSDATA) + b'"},"keyunwrapparams":{"dc":null,'
    b'"annotation":null}}'
)
SKOPEO_UNWRAP = (
    b'{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":'
    b'{"myprov":["eA=="]}},"annotation":"eyJ2IjogMSwgImsiOiAidiJ9"}}'
)


@pytest.fixture(scope="module")
def rsa3072() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 3072)


def skr_unwrap_request(annotation_field: object, dc_value: object = "c2ty") -> bytes:
    """The Go sidecar's documented unwrap request (GO_SIDECAR.md §1), `dc` value base64 of 'skr'."""
    return json.dumps(
        {
            "op": "keyunwrap",
            "keywrapparams": {"ec": None, "optsdata": None},
            "keyunwrapparams": {
                "dc": {"Parameters": {"attestation-agent": [dc_value]}},
                "annotation": annotation_field,
            },
        }
    ).encode()


# --- the JSON and its byte encodings ---------------------------------------------------------------------


def test_skopeo_wrap_request_parses_with_go_field_names():
    request = ocicrypt.parse_request(SKOPEO_WRAP)
    assert request.op == "keywrap"
    assert request.ec_parameters == {"myprov": (b"anything",)}
    assert request.optsdata == OPTSDATA
    assert request.dc_parameters is None and request.annotation is None


def test_skopeo_unwrap_request_parses_and_is_not_for_skr():
    request = ocicrypt.parse_request(SKOPEO_UNWRAP)
    assert request.op == "keyunwrap"
    assert request.dc_parameters == {"myprov": (b"x",)}
    assert request.annotation == b'{"v": 1, "k": "v"}'
    # skopeo calls every configured provider whatever key name was given (§9): skr must refuse by itself
    with pytest.raises(BadRequest) as info:
        ocicrypt.authorize_unwrap(request)
    assert info.value.code == "provider_parameter_mismatch"


def test_an_integer_array_is_the_same_bytes_as_base64():
    packet = b'{"kid":"k","wrapped_data":"AAE="}'
    as_text = ocicrypt.parse_request(skr_unwrap_request(base64.b64encode(packet).decode()))
    as_array = ocicrypt.parse_request(skr_unwrap_request(list(packet), dc_value=list(b"skr")))
    assert as_text.annotation == as_array.annotation == packet
    assert as_array.dc_parameters == {"attestation-agent": (b"skr",)}


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("not base64!", "neither standard base64"),
        ([0, 256], "byte values"),
        ([True], "byte values"),
        ({"a": 1}, "base64 string, an array"),
    ],
)
def test_bad_byte_values_are_refused_with_a_sentence(value, complaint):
    with pytest.raises(BadRequest, match=complaint) as info:
        ocicrypt.parse_request(skr_unwrap_request(value))
    assert info.value.code == "invalid_keyprovider_request"


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b"{", b'{"op":"delete"}', b'{"op":"keyunwrap","keyunwrapparams":[]}']
)
def test_requests_that_are_not_the_protocol_are_refused(raw):
    with pytest.raises(BadRequest) as info:
        ocicrypt.parse_request(raw)
    assert info.value.code == "invalid_keyprovider_request"


def test_answers_are_integer_arrays_without_the_unused_results_object():
    assert ocicrypt.unwrap_answer(b"\x00\x7f\xff") == b'{"keyunwrapresults":{"optsdata":[0,127,255]}}'
    assert ocicrypt.wrap_answer(b"{}") == b'{"keywrapresults":{"annotation":[123,125]}}'


def test_parse_answer_reads_the_go_sidecars_base64_reply():
    go_reply = b'{"keywrapresults":{"annotation":null},"keyunwrapresults":{"optsdata":"aGVsbG8="}}'
    assert ocicrypt.parse_answer(go_reply) == (None, b"hello")


# --- authorization by the decrypt parameter -------------------------------------------------------------


@pytest.mark.parametrize("value", ["skr", "SKR", "Skr"])
def test_attestation_agent_skr_authorizes_in_any_case(value):
    ocicrypt.authorize_unwrap(
        ocicrypt.parse_request(skr_unwrap_request(None, base64.b64encode(value.encode()).decode()))
    )


@pytest.mark.parametrize("value", [b"aasp", b"skr:key", b"skr ", b"", b"Enabled"])
def test_other_decrypt_parameters_are_refused(value):
    request = ocicrypt.parse_request(skr_unwrap_request(None, base64.b64encode(value).decode()))
    with pytest.raises(BadRequest, match="another provider") as info:
        ocicrypt.authorize_unwrap(request)
    assert info.value.code == "provider_parameter_mismatch"


def test_no_decrypt_config_is_refused():
    raw = b'{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":"e30="}}'
    with pytest.raises(BadRequest, match="not for skr"):
        ocicrypt.authorize_unwrap(ocicrypt.parse_request(raw))


def test_wrap_parameter_is_skr_colon_keypath():
    def keypath(value: bytes) -> str:
        raw = json.dumps(
            {
                "op": "keywrap",
                "keywrapparams": {
                    "ec": {"Parameters": {"attestation-agent": [base64.b64encode(value).decode()]}}
                },
            }
        ).encode()
        return ocicrypt.wrap_keypath(ocicrypt.parse_request(raw))

    assert keypath(b"skr:/keys/image-key") == "/keys/image-key"
    assert keypath(b"SKR:k") == "k"
    for bad in (b"skr", b"aasp:/keys/k", b"skr:"):
        with pytest.raises(BadRequest):
            keypath(bad)


# --- the annotation packet ------------------------------------------------------------------------------


def test_annotation_is_byte_exact_go_json_marshal():
    packet = ocicrypt.AnnotationPacket(
        kid="image-key",
        wrapped_data=b"\x00\x01\x02",
        kms_endpoint="myhsm.managedhsm.azure.net",
        attester_endpoint="sharedeus.eus.attest.azure.net",
    )
    # encoding/json: struct field order, []byte as std base64, empty iv omitted, no spaces
    assert ocicrypt.encode_annotation(packet) == (
        b'{"kid":"image-key","wrapped_data":"AAEC","wrap_type":"rsa_3072",'
        b'"kms_endpoint":"myhsm.managedhsm.azure.net","attester_endpoint":"sharedeus.eus.attest.azure.net"}'
    )


def test_annotation_escapes_html_characters_as_go_does():
    packet = ocicrypt.AnnotationPacket(kid="a<b>&", wrapped_data=b"", wrap_type="")
    assert ocicrypt.encode_annotation(packet) == b'{"kid":"a\\u003cb\\u003e\\u0026","wrapped_data":""}'


def test_annotation_parses_the_go_form():
    raw = b'{"kid":"k1","wrapped_data":"AAEC","wrap_type":"rsa_3072","kms_endpoint":"h",'
    raw += b'"attester_endpoint":"m"}'
    packet = ocicrypt.parse_annotation(raw)
    assert (packet.kid, packet.wrapped_data, packet.kms_endpoint, packet.attester_endpoint) == (
        "k1",
        b"\x00\x01\x02",
        "h",
        "m",
    )
    assert "AAEC" not in repr(packet) and "\\x00" not in repr(packet)


@pytest.mark.parametrize(
    "raw",
    [
        b"nope",
        b"[]",
        b'{"wrapped_data":"AA=="}',
        b'{"kid":"k"}',
        b'{"kid":"k","wrapped_data":"**"}',
        b'{"kid":1}',
    ],
)
def test_broken_annotations_are_refused(raw):
    with pytest.raises(BadRequest) as info:
        ocicrypt.parse_annotation(raw)
    assert info.value.code == "invalid_annotation"


def test_unwrap_packet_checks_op_and_authorization_before_the_annotation():
    with pytest.raises(BadRequest, match='"op": "keyunwrap"'):
        unwrap_packet(SKOPEO_WRAP)
    with pytest.raises(BadRequest, match="another provider"):
        unwrap_packet(skr_unwrap_request("bm90IGpzb24=", dc_value="eA=="))
    assert (
        unwrap_packet(skr_unwrap_request(base64.b64encode(b'{"kid":"k","wrapped_data":"AA=="}').decode())).kid
        == "k"
    )


# --- RSA-OAEP-SHA256 and the wrap tool --------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "limit"), [(2048, 190), (3072, 318), (4096, 446)])
def test_oaep_sha256_limit(bits, limit):
    assert ocicrypt.oaep_sha256_limit(bits) == limit


def test_oaep_wrap_at_the_limit_decrypts_independently_and_one_more_byte_is_refused(rsa3072):
    secret = os.urandom(318)
    ciphertext = ocicrypt.oaep_wrap(rsa3072.public_key(), secret)
    assert rsa3072.decrypt(ciphertext, OAEP256) == secret
    with pytest.raises(
        BadRequest, match="319 bytes, but RSA-OAEP-SHA256 with an RSA-3072 key takes at most 318"
    ):
        ocicrypt.oaep_wrap(rsa3072.public_key(), secret + b"!")


@pytest.fixture
def keypath(tmp_path, rsa3072):
    path = tmp_path / "keys" / "image-key"
    path.parent.mkdir()
    write_key_info(
        path, rsa3072.public_key(), kms_endpoint="myhsm.managedhsm.azure.net", attester_endpoint="maa.example"
    )
    return path


def test_key_info_files_are_the_go_tools(keypath, rsa3072):
    doc = json.loads((keypath.parent / "image-key-info.json").read_text())
    assert set(doc) == {"public_key_path", "kms_endpoint", "attester_endpoint"}
    pem = (keypath.parent / "image-key-pub.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert doc["public_key_path"] == str(keypath.parent / "image-key-pub.pem")
    _, public = read_key_info(keypath)
    assert public.public_numbers() == rsa3072.public_key().public_numbers()


def test_wrap_for_keypath_makes_the_go_packet(keypath, rsa3072):
    packet = json.loads(wrap_for_keypath(keypath, OPTSDATA))
    assert list(packet) == ["kid", "wrapped_data", "wrap_type", "kms_endpoint", "attester_endpoint"]
    assert packet["kid"] == "image-key" and packet["wrap_type"] == "rsa_3072"
    assert (
        packet["kms_endpoint"] == "myhsm.managedhsm.azure.net"
        and packet["attester_endpoint"] == "maa.example"
    )
    assert rsa3072.decrypt(base64.b64decode(packet["wrapped_data"]), OAEP256) == OPTSDATA


def test_missing_and_broken_key_info_are_named(tmp_path):
    with pytest.raises(NotFound, match=r"nokey-info\.json does not exist"):
        read_key_info(tmp_path / "nokey")
    (tmp_path / "bad-info.json").write_text('{"public_key_path": 7}')
    with pytest.raises(BadRequest, match="must be an object of strings"):
        read_key_info(tmp_path / "bad")
    (tmp_path / "priv-info.json").write_text(json.dumps({"public_key_path": str(tmp_path / "priv.pem")}))
    (tmp_path / "priv.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BadRequest, match="is not a PEM public key"):
        read_key_info(tmp_path / "priv")


def test_wrap_key_request_answers_an_annotation(keypath, rsa3072):
    raw = json.dumps(
        {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {
                    "Parameters": {
                        "attestation-agent": [base64.b64encode(f"skr:{keypath}".encode()).decode()]
                    }
                },
                "optsdata": base64.b64encode(OPTSDATA).decode(),
            },
        }
    ).encode()
    answer = json.loads(wrap_key_locally(raw))
    assert set(answer) == {"keywrapresults"}
    packet = json.loads(bytes(answer["keywrapresults"]["annotation"]))
    assert rsa3072.decrypt(base64.b64decode(packet["wrapped_data"]), OAEP256) == OPTSDATA


def test_skr_wrap_writes_std_base64_of_the_packet(keypath, rsa3072, tmp_path, capsys):
    infile, outfile = tmp_path / "secret.bin", tmp_path / "out.b64"
    infile.write_bytes(OPTSDATA)
    assert main(["wrap", "--infile", str(infile), "--keypath", str(keypath), "--outfile", str(outfile)]) == 0
    packet = json.loads(base64.b64decode(outfile.read_bytes(), validate=True))
    assert packet["kid"] == "image-key"
    assert rsa3072.decrypt(base64.b64decode(packet["wrapped_data"]), OAEP256) == OPTSDATA
    # the Go flag spellings work too
    assert main(["wrap", "-infile", str(infile), "-keypath", str(keypath), "-outfile", str(outfile)]) == 0


def test_skr_wrap_refuses_a_plaintext_over_the_limit_in_one_line(keypath, tmp_path, capsys):
    infile, outfile = tmp_path / "big.bin", tmp_path / "out.b64"
    infile.write_bytes(b"x" * 400)
    assert main(["wrap", "--infile", str(infile), "--keypath", str(keypath), "--outfile", str(outfile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "400 bytes" in err and "at most 318 bytes" in err
    assert not outfile.exists()


# --- /key/unwrap algorithms -------------------------------------------------------------------------------


def rsa_jwk(key: rsa.RSAPrivateKey) -> str:
    from skr.akv.jwk import jwk_to_json, private_key_to_jwk

    return jwk_to_json(private_key_to_jwk(key))


def oct_jwk(secret: bytes) -> str:
    return json.dumps({"kty": "oct", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()})


def test_rsa_oaep_256_and_rsa_oaep(rsa3072):
    secret = os.urandom(32)
    jwk = rsa_jwk(rsa3072)
    assert algorithms.decrypt("RSA-OAEP-256", jwk, rsa3072.public_key().encrypt(secret, OAEP256)) == secret
    assert algorithms.decrypt("RSA-OAEP", jwk, rsa3072.public_key().encrypt(secret, OAEP1)) == secret
    with pytest.raises(BadRequest) as info:  # SHA-1 ciphertext under the SHA-256 algorithm
        algorithms.decrypt("RSA-OAEP-256", jwk, rsa3072.public_key().encrypt(secret, OAEP1))
    assert info.value.code == "unwrap_failed"


@pytest.mark.parametrize(("alg", "size"), [("A128KW", 16), ("A192KW", 24), ("A256KW", 32)])
def test_aes_key_wrap(alg, size):
    kek, secret = os.urandom(size), os.urandom(32)
    assert algorithms.decrypt(alg, oct_jwk(kek), aes_key_wrap(kek, secret)) == secret
    with pytest.raises(BadRequest) as info:
        algorithms.decrypt(alg, oct_jwk(kek), aes_key_wrap(os.urandom(size), secret))
    assert info.value.code == "unwrap_failed"


@pytest.mark.parametrize("alg", ["RSA1_5", "A256GCM", "dir", ""])
def test_unsupported_algorithms_are_400(alg, rsa3072):
    with pytest.raises(BadRequest) as info:
        algorithms.decrypt(alg, rsa_jwk(rsa3072), b"x" * 384)
    assert info.value.code == "unsupported_alg" and http_status(info.value) == 400


def test_algorithm_and_key_type_must_match(rsa3072):
    with pytest.raises(BadRequest, match="does not apply to the released oct key"):
        algorithms.decrypt("RSA-OAEP-256", oct_jwk(os.urandom(32)), b"x")
    with pytest.raises(BadRequest, match="does not apply to the released RSA key"):
        algorithms.decrypt("A256KW", rsa_jwk(rsa3072), b"x" * 40)
    with pytest.raises(BadRequest, match="needs a 256-bit key"):
        algorithms.decrypt("A256KW", oct_jwk(os.urandom(16)), b"x" * 40)
