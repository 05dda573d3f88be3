// The latentwire TypeScript client: connection helpers and the orchestrator's contracts. Every other
// service's messages and descriptor are under ./gen/latentwire/<service>/<version>/<file>_pb.js.
export * from "./client.js";
export * from "./progress.js";
export * from "./gen/latentwire/orchestrator/v1/orchestrator_pb.js";
export * from "./gen/latentwire/common/v1/status_pb.js";
export * from "./gen/latentwire/common/v1/model_pb.js";
