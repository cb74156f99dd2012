from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KeyProviderKeyWrapProtocolInput(_message.Message):
    __slots__ = ("key_provider_key_wrap_protocol_input",)
    KEY_PROVIDER_KEY_WRAP_PROTOCOL_INPUT_FIELD_NUMBER: _ClassVar[int]
    key_provider_key_wrap_protocol_input: bytes
    def __init__(self, key_provider_key_wrap_protocol_input: _Optional[bytes] = ...) -> None: ...

class KeyProviderKeyWrapProtocolOutput(_message.Message):
    __slots__ = ("key_provider_key_wrap_protocol_output",)
    KEY_PROVIDER_KEY_WRAP_PROTOCOL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    key_provider_key_wrap_protocol_output: bytes
    def __init__(self, key_provider_key_wrap_protocol_output: _Optional[bytes] = ...) -> None: ...

class KeyProviderGetReportInput(_message.Message):
    __slots__ = ("report_data_hex_string",)
    REPORT_DATA_HEX_STRING_FIELD_NUMBER: _ClassVar[int]
    report_data_hex_string: str
    def __init__(self, report_data_hex_string: _Optional[str] = ...) -> None: ...

class KeyProviderGetReportOutput(_message.Message):
    __slots__ = ("report_hex_string",)
    REPORT_HEX_STRING_FIELD_NUMBER: _ClassVar[int]
    report_hex_string: str
    def __init__(self, report_hex_string: _Optional[str] = ...) -> None: ...

class KeyProviderGetAttestationDataInput(_message.Message):
    __slots__ = ("b64_runtime_data_string",)
    B64_RUNTIME_DATA_STRING_FIELD_NUMBER: _ClassVar[int]
    b64_runtime_data_string: str
    def __init__(self, b64_runtime_data_string: _Optional[str] = ...) -> None: ...

class KeyProviderGetAttestationDataOutput(_message.Message):
    __slots__ = ("endorsed_tcb", "certs", "attestation_report", "uvm_reference_info")
    ENDORSED_TCB_FIELD_NUMBER: _ClassVar[int]
    CERTS_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_REPORT_FIELD_NUMBER: _ClassVar[int]
    UVM_REFERENCE_INFO_FIELD_NUMBER: _ClassVar[int]
    endorsed_tcb: str
    certs: str
    attestation_report: str
    uvm_reference_info: str
    def __init__(self, endorsed_tcb: _Optional[str] = ..., certs: _Optional[str] = ..., attestation_report: _Optional[str] = ..., uvm_reference_info: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
