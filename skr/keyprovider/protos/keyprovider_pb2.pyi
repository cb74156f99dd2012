from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class keyProviderKeyWrapProtocolInput(_message.Message):
    __slots__ = ("KeyProviderKeyWrapProtocolInput",)
    KEYPROVIDERKEYWRAPPROTOCOLINPUT_FIELD_NUMBER: _ClassVar[int]
    KeyProviderKeyWrapProtocolInput: bytes
    def __init__(self, KeyProviderKeyWrapProtocolInput: _Optional[bytes] = ...) -> None: ...

class keyProviderKeyWrapProtocolOutput(_message.Message):
    __slots__ = ("KeyProviderKeyWrapProtocolOutput",)
    KEYPROVIDERKEYWRAPPROTOCOLOUTPUT_FIELD_NUMBER: _ClassVar[int]
    KeyProviderKeyWrapProtocolOutput: bytes
    def __init__(self, KeyProviderKeyWrapProtocolOutput: _Optional[bytes] = ...) -> None: ...

class keyProviderGetReportInput(_message.Message):
    __slots__ = ("reportDataHexString",)
    REPORTDATAHEXSTRING_FIELD_NUMBER: _ClassVar[int]
    reportDataHexString: str
    def __init__(self, reportDataHexString: _Optional[str] = ...) -> None: ...

class keyProviderGetReportOutput(_message.Message):
    __slots__ = ("reportHexString",)
    REPORTHEXSTRING_FIELD_NUMBER: _ClassVar[int]
    reportHexString: str
    def __init__(self, reportHexString: _Optional[str] = ...) -> None: ...

class keyProviderGetAttestationDataInput(_message.Message):
    __slots__ = ("b64_runtime_data_string",)
    B64_RUNTIME_DATA_STRING_FIELD_NUMBER: _ClassVar[int]
    b64_runtime_data_string: str
    def __init__(self, b64_runtime_data_string: _Optional[str] = ...) -> None: ...

class keyProviderGetAttestationDataOutput(_message.Message):
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
