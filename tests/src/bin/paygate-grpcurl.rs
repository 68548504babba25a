//! A grpcurl-compatible gRPC client, so that the test of the README's grpcurl section runs where grpcurl is
//! not installed. It implements the part of grpcurl that section uses: `-plaintext`, `-cacert FILE`,
//! `-H 'name: value'`, `-d JSON` or `-d @` (standard input); `list [SERVICE]`, `describe [SYMBOL]` and unary
//! calls `host:port package.Service/Method`. Like grpcurl it needs no `.proto` file: it asks the server's
//! reflection service for the descriptors, reads the request as proto3 JSON (field names in either case) and
//! prints the answer as grpcurl does: proto3 JSON with lowerCamelCase names, 64-bit integers as strings,
//! enums by name, fields at their default value left out, indented by two spaces. A failed call prints
//! grpcurl's `ERROR:` block on standard error and exits with grpcurl's status, 64 plus the gRPC code; other
//! failures exit 1, bad usage 2. `describe` prints the definitions without their comments.

#![allow(clippy::print_stdout)] // printing answers is this program's job

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read,
    process::ExitCode,
    str::FromStr,
};

use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, SerializeOptions, ServiceDescriptor,
};
use prost_types::FileDescriptorProto;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const USAGE: &str = "usage: grpcurl [-plaintext] [-cacert FILE] [-H 'name: value']… [-d JSON|@] \
                     host:port (list [SERVICE] | describe [SYMBOL] | package.Service/Method)";

/// Why the program stops, which decides its exit status as grpcurl's would.
enum Failure {
    Usage(String),
    Other(String),
    Call(Status),
}

impl<E: std::error::Error> From<E> for Failure {
    /// Joins the error's chain of causes into one line, leaving out a cause its effect already quotes.
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = cause.source();
        }
        Self::Other(message)
    }
}

fn other(message: impl Into<String>) -> Failure {
    Failure::Other(message.into())
}

struct Options {
    plaintext: bool,
    cacert: Option<String>,
    headers: Vec<(String, String)>,
    data: Option<String>,
    address: String,
    command: Command,
}

enum Command {
    List(Option<String>),
    Describe(Option<String>),
    Invoke(String),
}

/// Parses grpcurl's command line: flags with one or two dashes, `-flag value` or `-flag=value`, up to the
/// first argument that is not a flag (as Go's flag package does).
fn parse_options(mut arguments: impl Iterator<Item = String>) -> Result<Options, Failure> {
    let mut plaintext = false;
    let mut cacert = None;
    let mut headers = Vec::new();
    let mut data = None;
    let mut positional = Vec::new();
    while let Some(argument) = arguments.next() {
        if argument == "--" {
            positional.extend(arguments.by_ref());
            break;
        }
        let Some(flag) = argument
            .strip_prefix("--")
            .or_else(|| argument.strip_prefix('-'))
            .filter(|flag| !flag.is_empty())
        else {
            positional.push(argument);
            positional.extend(arguments.by_ref());
            break;
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        let mut value = || {
            inline_value
                .clone()
                .or_else(|| arguments.next())
                .ok_or_else(|| Failure::Usage(format!("flag needs an argument: -{name}")))
        };
        match name {
            "plaintext" => plaintext = inline_value.as_deref().is_none_or(|value| value == "true"),
            "cacert" => cacert = Some(value()?),
            "H" => {
                let header = value()?;
                let (header_name, header_value) = header.split_once(':').ok_or_else(|| {
                    Failure::Usage(format!("header `{header}` is not `name: value`"))
                })?;
                headers.push((
                    header_name.trim().to_ascii_lowercase(),
                    header_value.trim().to_owned(),
                ));
            }
            "d" => data = Some(value()?),
            "h" | "help" => return Err(Failure::Usage(USAGE.to_owned())),
            _ => {
                return Err(Failure::Usage(format!(
                    "flag provided but not defined: -{name}"
                )));
            }
        }
    }
    if plaintext && cacert.is_some() {
        return Err(Failure::Usage(
            "the -cacert argument can only be used without -plaintext".to_owned(),
        ));
    }
    let mut positional = positional.into_iter();
    let address = positional
        .next()
        .ok_or_else(|| Failure::Usage(format!("too few arguments\n{USAGE}")))?;
    let command = match (positional.next(), positional.next()) {
        (Some(verb), symbol) if verb == "list" => Command::List(symbol),
        (Some(verb), symbol) if verb == "describe" => Command::Describe(symbol),
        (Some(method), None) => Command::Invoke(method),
        _ => return Err(Failure::Usage(format!("wrong arguments\n{USAGE}"))),
    };
    if positional.next().is_some() {
        return Err(Failure::Usage(format!("too many arguments\n{USAGE}")));
    }
    Ok(Options {
        plaintext,
        cacert,
        headers,
        data,
        address,
        command,
    })
}

async fn connect(options: &Options) -> Result<Channel, Failure> {
    let scheme = if options.plaintext { "http" } else { "https" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", options.address))?;
    if !options.plaintext {
        let tls = match &options.cacert {
            Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
                std::fs::read(path).map_err(|error| other(format!("-cacert {path}: {error}")))?,
            )),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint
        .connect()
        .await
        .map_err(|error| match Failure::from(error) {
            Failure::Other(message) => other(format!(
                "Failed to dial target host \"{}\": {message}",
                options.address
            )),
            failure => failure,
        })
}

fn add_headers(metadata: &mut MetadataMap, headers: &[(String, String)]) -> Result<(), Failure> {
    for (name, value) in headers {
        metadata.append(
            AsciiMetadataKey::from_bytes(name.as_bytes())?,
            AsciiMetadataValue::from_str(value)?,
        );
    }
    Ok(())
}

/// The server's reflection service, and the descriptors learnt from it so far.
struct Reflection {
    client: ServerReflectionClient<Channel>,
    headers: Vec<(String, String)>,
    pool: DescriptorPool,
}

impl Reflection {
    async fn ask(&mut self, request: MessageRequest) -> Result<MessageResponse, Failure> {
        let mut call = tonic::Request::new(tokio_stream::once(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }));
        add_headers(call.metadata_mut(), &self.headers)?;
        let mut answers = self
            .client
            .server_reflection_info(call)
            .await
            .map_err(Failure::Call)?
            .into_inner();
        match answers
            .message()
            .await
            .map_err(Failure::Call)?
            .and_then(|answer| answer.message_response)
        {
            Some(MessageResponse::ErrorResponse(error)) => Err(other(error.error_message)),
            Some(answer) => Ok(answer),
            None => Err(other("the server's reflection service answered nothing")),
        }
    }

    async fn service_names(&mut self) -> Result<BTreeSet<String>, Failure> {
        match self
            .ask(MessageRequest::ListServices(String::new()))
            .await?
        {
            MessageResponse::ListServicesResponse(list) => Ok(list
                .service
                .into_iter()
                .map(|service| service.name)
                .collect()),
            _ => Err(other(
                "the reflection service answered a list with something else",
            )),
        }
    }

    /// Adds the file that defines `symbol`, and every file it imports, to the pool.
    async fn learn_symbol(&mut self, symbol: &str) -> Result<(), Failure> {
        let answer = self
            .ask(MessageRequest::FileContainingSymbol(symbol.to_owned()))
            .await
            .map_err(|failure| match failure {
                Failure::Other(message) => other(format!(
                    "Symbol \"{symbol}\" not found on the server: {message}"
                )),
                failure => failure,
            })?;
        let mut files = BTreeMap::new();
        take_files(answer, &mut files)?;
        loop {
            let missing: Vec<String> = files
                .values()
                .flat_map(|file| file.dependency.iter())
                .filter(|name| {
                    !files.contains_key(name.as_str()) && self.pool.get_file_by_name(name).is_none()
                })
                .cloned()
                .collect();
            let Some(name) = missing.into_iter().next() else {
                break;
            };
            let answer = self.ask(MessageRequest::FileByFilename(name)).await?;
            take_files(answer, &mut files)?;
        }
        let new_files: Vec<FileDescriptorProto> = files
            .into_values()
            .filter(|file| self.pool.get_file_by_name(file.name()).is_none())
            .collect();
        self.pool.add_file_descriptor_protos(new_files)?;
        Ok(())
    }

    async fn service(&mut self, name: &str) -> Result<ServiceDescriptor, Failure> {
        self.learn_symbol(name).await?;
        self.pool
            .get_service_by_name(name)
            .ok_or_else(|| other(format!("Symbol \"{name}\" is not a service")))
    }

    /// Finds a method named `package.Service/Method` or `package.Service.Method`.
    async fn method(&mut self, name: &str) -> Result<MethodDescriptor, Failure> {
        let (service, method) = name
            .split_once('/')
            .or_else(|| name.rsplit_once('.'))
            .ok_or_else(|| other(format!("given method name \"{name}\" is not in expected format: 'service/method' or 'service.method'")))?;
        self.service(service)
            .await?
            .methods()
            .find(|candidate| candidate.name() == method)
            .ok_or_else(|| {
                other(format!(
                    "service \"{service}\" does not include a method named \"{method}\""
                ))
            })
    }
}

fn take_files(
    answer: MessageResponse,
    files: &mut BTreeMap<String, FileDescriptorProto>,
) -> Result<(), Failure> {
    let MessageResponse::FileDescriptorResponse(response) = answer else {
        return Err(other(
            "the reflection service answered a file request with something else",
        ));
    };
    for encoded in response.file_descriptor_proto {
        let file = FileDescriptorProto::decode(encoded.as_slice())?;
        files.insert(file.name().to_owned(), file);
    }
    Ok(())
}

/// Encodes requests and decodes answers of a message type known only at run time.
struct DynamicCodec {
    answer: MessageDescriptor,
}

struct DynamicEncoder;

struct DynamicDecoder {
    answer: MessageDescriptor,
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder {
            answer: self.answer.clone(),
        }
    }
}

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|error| Status::internal(format!("encoding the request: {error}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.answer.clone(), buf)
            .map(Some)
            .map_err(|error| Status::internal(format!("decoding the answer: {error}")))
    }
}

fn read_request(options: &Options, request: MessageDescriptor) -> Result<DynamicMessage, Failure> {
    let data = match options.data.as_deref() {
        Some("@") => {
            let mut data = String::new();
            std::io::stdin().read_to_string(&mut data)?;
            data
        }
        Some(data) => data.to_owned(),
        None => String::new(),
    };
    if data.trim().is_empty() {
        return Ok(DynamicMessage::new(request));
    }
    let mut json = serde_json::Deserializer::from_str(&data);
    let message = DynamicMessage::deserialize(request, &mut json)
        .map_err(|error| other(format!("error getting request data: {error}")))?;
    json.end()
        .map_err(|_| other("method is unary but request data contained more than 1 message"))?;
    Ok(message)
}

fn to_json(message: &DynamicMessage) -> Result<String, Failure> {
    let mut json = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(
        &mut json,
        serde_json::ser::PrettyFormatter::with_indent(b"  "),
    );
    message.serialize_with_options(&mut serializer, &SerializeOptions::new())?;
    Ok(String::from_utf8(json)?)
}

async fn invoke(
    options: &Options,
    channel: Channel,
    method: MethodDescriptor,
) -> Result<(), Failure> {
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err(other(format!(
            "{} streams; this client calls only unary methods",
            method.full_name()
        )));
    }
    let mut request = tonic::Request::new(read_request(options, method.input())?);
    add_headers(request.metadata_mut(), &options.headers)?;
    let path = PathAndQuery::from_str(&format!(
        "/{}/{}",
        method.parent_service().full_name(),
        method.name()
    ))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let answer = grpc
        .unary(
            request,
            path,
            DynamicCodec {
                answer: method.output(),
            },
        )
        .await
        .map_err(Failure::Call)?;
    println!("{}", to_json(answer.get_ref())?);
    Ok(())
}

fn type_name(field: &FieldDescriptor) -> String {
    if let Kind::Message(entry) = field.kind()
        && field.is_map()
    {
        return format!(
            "map<{}, {}>",
            type_name(&entry.map_entry_key_field()),
            type_name(&entry.map_entry_value_field())
        );
    }
    match field.kind() {
        Kind::Double => "double".to_owned(),
        Kind::Float => "float".to_owned(),
        Kind::Int32 => "int32".to_owned(),
        Kind::Int64 => "int64".to_owned(),
        Kind::Uint32 => "uint32".to_owned(),
        Kind::Uint64 => "uint64".to_owned(),
        Kind::Sint32 => "sint32".to_owned(),
        Kind::Sint64 => "sint64".to_owned(),
        Kind::Fixed32 => "fixed32".to_owned(),
        Kind::Fixed64 => "fixed64".to_owned(),
        Kind::Sfixed32 => "sfixed32".to_owned(),
        Kind::Sfixed64 => "sfixed64".to_owned(),
        Kind::Bool => "bool".to_owned(),
        Kind::String => "string".to_owned(),
        Kind::Bytes => "bytes".to_owned(),
        Kind::Message(message) => format!(".{}", message.full_name()),
        Kind::Enum(enumeration) => format!(".{}", enumeration.full_name()),
    }
}

fn method_line(method: &MethodDescriptor) -> String {
    let stream = |streams: bool| if streams { "stream " } else { "" };
    format!(
        "rpc {} ( {}.{} ) returns ( {}.{} );",
        method.name(),
        stream(method.is_client_streaming()),
        method.input().full_name(),
        stream(method.is_server_streaming()),
        method.output().full_name()
    )
}

fn describe_service(service: &ServiceDescriptor) -> String {
    let mut text = format!(
        "{} is a service:\nservice {} {{\n",
        service.full_name(),
        service.name()
    );
    for method in service.methods() {
        text += &format!("  {}\n", method_line(&method));
    }
    text + "}"
}

fn describe_message(message: &MessageDescriptor) -> String {
    let mut text = format!(
        "{} is a message:\nmessage {} {{\n",
        message.full_name(),
        message.name()
    );
    for field in message.fields() {
        let label = if field.is_list() { "repeated " } else { "" };
        text += &format!(
            "  {label}{} {} = {};\n",
            type_name(&field),
            field.name(),
            field.number()
        );
    }
    text + "}"
}

fn describe_enum(enumeration: &EnumDescriptor) -> String {
    let mut text = format!(
        "{} is an enum:\nenum {} {{\n",
        enumeration.full_name(),
        enumeration.name()
    );
    for value in enumeration.values() {
        text += &format!("  {} = {};\n", value.name(), value.number());
    }
    text + "}"
}

async fn describe(reflection: &mut Reflection, symbol: &str) -> Result<String, Failure> {
    reflection.learn_symbol(symbol).await?;
    let pool = &reflection.pool;
    if let Some(service) = pool.get_service_by_name(symbol) {
        return Ok(describe_service(&service));
    }
    if let Some(message) = pool.get_message_by_name(symbol) {
        return Ok(describe_message(&message));
    }
    if let Some(enumeration) = pool.get_enum_by_name(symbol) {
        return Ok(describe_enum(&enumeration));
    }
    if let Some((service, method)) = symbol.rsplit_once('.')
        && let Some(method) = pool.get_service_by_name(service).and_then(|service| {
            service
                .methods()
                .find(|candidate| candidate.name() == method)
        })
    {
        return Ok(format!(
            "{} is a method:\n{}",
            method.full_name(),
            method_line(&method)
        ));
    }
    Err(other(format!(
        "Symbol \"{symbol}\" is not a service, message, enum or method"
    )))
}

async fn run(options: Options) -> Result<(), Failure> {
    let channel = connect(&options).await?;
    let mut reflection = Reflection {
        client: ServerReflectionClient::new(channel.clone()),
        headers: options.headers.clone(),
        pool: DescriptorPool::new(),
    };
    match &options.command {
        Command::List(None) => {
            for service in reflection.service_names().await? {
                println!("{service}");
            }
        }
        Command::List(Some(service)) => {
            let service = reflection.service(service).await?;
            let methods: BTreeSet<String> = service
                .methods()
                .map(|method| method.full_name().to_owned())
                .collect();
            for method in methods {
                println!("{method}");
            }
        }
        Command::Describe(symbol) => {
            let symbols = match symbol {
                Some(symbol) => vec![symbol.clone()],
                None => reflection.service_names().await?.into_iter().collect(),
            };
            for symbol in symbols {
                println!("{}", describe(&mut reflection, &symbol).await?);
            }
        }
        Command::Invoke(name) => {
            let method = reflection.method(name).await?;
            invoke(&options, channel, method).await?;
        }
    }
    Ok(())
}

/// Names a gRPC code as grpcurl (Go's `codes.Code`) spells it.
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        tonic::Code::Cancelled => "Canceled".to_owned(),
        code => format!("{code:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let outcome = match parse_options(std::env::args().skip(1)) {
        Ok(options) => run(options).await,
        Err(failure) => Err(failure),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("Failed: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Call(status)) => {
            eprintln!(
                "ERROR:\n  Code: {}\n  Message: {}",
                code_name(status.code()),
                status.message()
            );
            ExitCode::from(64 + status.code() as u8)
        }
    }
}
