// Connections to latentwire services from Node: a Connect transport speaking gRPC over HTTP/2 to our grpc
// servers, with the same address, TLS and bearer-token conventions as the Python client
// (clients/python/latentwire/client/base.py, channels.py). The services' messages and descriptors are the
// generated modules under ./gen (buf generate --template buf.gen.typescript.yaml).
import { readFileSync } from "node:fs";

import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { ClassifierService } from "./gen/latentwire/classifier/v1/classifier_pb.js";
import { OrchestratorService } from "./gen/latentwire/orchestrator/v1/orchestrator_pb.js";
import { RegistryService } from "./gen/latentwire/registry/v1/registry_pb.js";

/** The orchestrator's address when neither an address nor $LATENTWIRE_SERVER is given (as `latentwire up`). */
export const DEFAULT_SERVER = "localhost:50051";

/** gRPC's default receive limit, 4 MiB: the most one response message may hold unless readMaxBytes says more. */
export const GRPC_DEFAULT_MAX_RECEIVE_BYTES = 4 * 1024 * 1024;

/** How to reach a service. Everything is optional: plaintext to $LATENTWIRE_SERVER (else localhost:50051). */
export interface ConnectionOptions {
  /** host:port of the service (default: $LATENTWIRE_SERVER, else localhost:50051). */
  address?: string;
  /** Bearer token, for an orchestrator started with --auth-tokens-file (sent as `authorization: Bearer ...`). */
  token?: string;
  /** TLS: CA bundle (PEM path) to verify the server with; TLS is on when given, or when `tls` is true. */
  tlsCa?: string;
  /** Client certificate (PEM path) for mutual TLS, with tlsKey. */
  tlsCert?: string;
  /** Key (PEM path) of tlsCert. */
  tlsKey?: string;
  /** TLS with the system's CAs when no tlsCa is given. */
  tls?: boolean;
  /** Name the server's certificate must carry when it differs from the address's host (TLS only). */
  tlsServerName?: string;
  /** Largest response message accepted, in bytes (default 4 MiB, gRPC's own default). */
  readMaxBytes?: number;
  /** Deadline of each call, in milliseconds (default: none). */
  timeoutMs?: number;
}

/** The address to use: `address`, else $LATENTWIRE_SERVER, else localhost:50051. */
export function serverAddress(address?: string): string {
  return address || process.env.LATENTWIRE_SERVER || DEFAULT_SERVER;
}

function bearer(token: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}

/** A gRPC (HTTP/2) transport to one service; share it between clients of services at the same address. */
export function createTransport(options: ConnectionOptions = {}): Transport {
  const address = serverAddress(options.address);
  const tls = Boolean(options.tls || options.tlsCa || options.tlsCert);
  if (Boolean(options.tlsCert) !== Boolean(options.tlsKey)) {
    throw new Error("mutual TLS needs both a client certificate (tlsCert) and its key (tlsKey)");
  }
  const nodeOptions = tls
    ? {
        ca: options.tlsCa ? readFileSync(options.tlsCa) : undefined,
        cert: options.tlsCert ? readFileSync(options.tlsCert) : undefined,
        key: options.tlsKey ? readFileSync(options.tlsKey) : undefined,
        servername: options.tlsServerName,
      }
    : {};
  return createGrpcTransport({
    baseUrl: `${tls ? "https" : "http"}://${address}`,
    nodeOptions,
    readMaxBytes: options.readMaxBytes ?? GRPC_DEFAULT_MAX_RECEIVE_BYTES,
    defaultTimeoutMs: options.timeoutMs,
    interceptors: options.token ? [bearer(options.token)] : [],
  });
}

/** A client of latentwire.orchestrator.v1.OrchestratorService (Generate, GetJob, CancelJob, ...). */
export function createOrchestratorClient(
  transport: Transport | ConnectionOptions = {},
): Client<typeof OrchestratorService> {
  return createClient(OrchestratorService, asTransport(transport));
}

/** A client of latentwire.classifier.v1.ClassifierService (the orchestrator routes it too). */
export function createClassifierClient(
  transport: Transport | ConnectionOptions = {},
): Client<typeof ClassifierService> {
  return createClient(ClassifierService, asTransport(transport));
}

/** A client of latentwire.registry.v1.RegistryService (default address: pass the registry's, e.g. localhost:50055). */
export function createRegistryClient(
  transport: Transport | ConnectionOptions = {},
): Client<typeof RegistryService> {
  return createClient(RegistryService, asTransport(transport));
}

function isTransport(value: Transport | ConnectionOptions): value is Transport {
  return typeof (value as Transport).unary === "function" && typeof (value as Transport).stream === "function";
}

function asTransport(value: Transport | ConnectionOptions): Transport {
  return isTransport(value) ? value : createTransport(value);
}

/**
 * The stable UPPER_SNAKE reason of a failed call (the google.rpc.ErrorInfo detail every latentwire error
 * carries; docs/errors.md lists them), or "" when there is none.
 */
export function errorReason(error: unknown): string {
  if (!(error instanceof ConnectError)) {
    return "";
  }
  for (const detail of error.details) {
    if ("type" in detail && detail.type === "google.rpc.ErrorInfo" && detail.value instanceof Uint8Array) {
      // ErrorInfo's field 1 is `reason` (google/rpc/error_details.proto); read it without its descriptor.
      const reader = new BinaryReader(detail.value);
      while (reader.pos < reader.len) {
        const [fieldNo, wireType] = reader.tag();
        if (fieldNo === 1 && wireType === WireType.LengthDelimited) {
          return reader.string();
        }
        reader.skip(wireType, fieldNo);
      }
    }
  }
  return "";
}

/** One line for a failed call: `[not_found] the message (REASON)`; any other error as its message. */
export function describeError(error: unknown): string {
  if (error instanceof ConnectError) {
    const reason = errorReason(error);
    return `[${Code[error.code]}] ${error.rawMessage}${reason ? ` (${reason})` : ""}`;
  }
  return error instanceof Error ? error.message : String(error);
}
