// Generate an image with latentwire from Node, then show cancellation:
//
//   node dist/examples/generate.js "a lighthouse at dusk" --out out.png --seed 7 --steps 20 --width 64 --height 64
//
// 1. Generate streams progress (one line per event on stdout: "step i/n ...") and the PNG is written to --out.
// 2. A second job (--cancel-steps steps, same request otherwise) is started and, at its first step, cancelled by
//    id with CancelJob; GetJob must then say JOB_STATE_CANCELLED with fewer steps done than asked
//    (--no-cancel-check skips this part).
// The exit status is 0 only when both held; 1 on any failure, 130 on Ctrl-C (which cancels the running job).
// The address is --address, else $LATENTWIRE_SERVER, else localhost:50051; plaintext unless --tls-ca / --tls.
import { writeFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { Code, ConnectError } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";

import {
  createOrchestratorClient,
  describe,
  describeError,
  GRPC_DEFAULT_MAX_RECEIVE_BYTES,
  JobState,
  serverAddress,
  type GenerateRequestSchema,
  type Job,
} from "../src/index.js";

const USAGE = `usage: generate.js PROMPT [--out out.png] [--seed N] [--steps N] [--width PX] [--height PX]
  [--negative TEXT] [--guidance X] [--scheduler NAME] [--model NAME] [--cancel-steps N] [--no-cancel-check]
  [--address HOST:PORT] [--token T] [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]
  [--timeout SECONDS] [--read-max-bytes N]`;

/** A mistake in the command line: the message, the usage, and exit status 2. */
class UsageError extends Error {}

function parseCommandLine() {
  try {
    return parseArgs(COMMAND_LINE);
  } catch (error) {
    throw new UsageError(error instanceof Error ? error.message : String(error));
  }
}

const COMMAND_LINE = {
  allowPositionals: true,
  options: {
    prompt: { type: "string" },
    out: { type: "string", short: "o", default: "out.png" },
    seed: { type: "string" },
    steps: { type: "string" },
    width: { type: "string", default: "0" },
    height: { type: "string", default: "0" },
    negative: { type: "string", default: "" },
    guidance: { type: "string" },
    scheduler: { type: "string", default: "" },
    model: { type: "string", default: "" },
    "cancel-steps": { type: "string", default: "150" },
    "no-cancel-check": { type: "boolean", default: false },
    address: { type: "string" },
    token: { type: "string", default: process.env.LATENTWIRE_TOKEN },
    tls: { type: "boolean", default: false },
    "tls-ca": { type: "string", default: process.env.LATENTWIRE_TLS_CA },
    "tls-cert": { type: "string", default: process.env.LATENTWIRE_TLS_CERT },
    "tls-key": { type: "string", default: process.env.LATENTWIRE_TLS_KEY },
    "tls-server-name": { type: "string" },
    timeout: { type: "string", default: "300" },
    "read-max-bytes": { type: "string", default: String(GRPC_DEFAULT_MAX_RECEIVE_BYTES) },
    help: { type: "boolean", short: "h", default: false },
  },
} as const;

/** A whole number from a flag, or a clear error naming the flag. */
function integer(flag: string, text: string | undefined, min: number): number | undefined {
  if (text === undefined) {
    return undefined;
  }
  const value = Number(text);
  if (!Number.isInteger(value) || value < min) {
    throw new UsageError(`--${flag} must be a whole number >= ${min}, got ${JSON.stringify(text)}`);
  }
  return value;
}

/** A number from a flag, or a clear error naming the flag. */
function decimal(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) {
    return undefined;
  }
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value)) {
    throw new UsageError(`--${flag} must be a number, got ${JSON.stringify(text)}`);
  }
  return value;
}

/** Ends the process with 130 on Ctrl-C, after aborting the running call (its job is cancelled with it). */
const interrupt = new AbortController();
process.once("SIGINT", () => interrupt.abort());

async function main(): Promise<void> {
  const { values, positionals } = parseCommandLine();
  const prompt = values.prompt ?? positionals.join(" ");
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (!prompt) {
    throw new UsageError("a prompt is required");
  }
  const address = serverAddress(values.address);
  const client = createOrchestratorClient({
    address,
    token: values.token,
    tls: values.tls,
    tlsCa: values["tls-ca"],
    tlsCert: values["tls-cert"],
    tlsKey: values["tls-key"],
    tlsServerName: values["tls-server-name"],
    readMaxBytes: integer("read-max-bytes", values["read-max-bytes"], 1),
    timeoutMs: (integer("timeout", values.timeout, 1) ?? 300) * 1000,
  });
  const seed = integer("seed", values.seed, 0);
  const request: MessageInitShape<typeof GenerateRequestSchema> = {
    prompt,
    negativePrompt: values.negative,
    seed: seed === undefined ? undefined : BigInt(seed),
    numInferenceSteps: integer("steps", values.steps, 1),
    guidanceScale: decimal("guidance", values.guidance),
    width: integer("width", values.width, 0),
    height: integer("height", values.height, 0),
    scheduler: values.scheduler,
    model: { name: values.model },
    // Ending the call early (Ctrl-C) cancels the job instead of leaving it running.
    cancelOnDisconnect: true,
  };

  // 1. Generate, streaming progress, and write the PNG.
  let png: Uint8Array | undefined;
  for await (const response of client.generate(request, { signal: interrupt.signal })) {
    console.log(describe(response));
    if (response.event.case === "result") {
      png = response.event.value.images[0]?.png;
    }
  }
  if (!png) {
    throw new Error("the stream ended without an image");
  }
  writeFileSync(values.out, png);
  console.log(`wrote ${values.out} (${png.length} bytes)`);

  if (values["no-cancel-check"]) {
    return;
  }
  // 2. Start a second, longer job and cancel it by id at its first step.
  const steps = integer("cancel-steps", values["cancel-steps"], 2) ?? 150;
  const job = await generateAndCancel(client, { ...request, numInferenceSteps: steps });
  if (job.state !== JobState.CANCELLED || job.completedSteps >= steps) {
    throw new Error(
      `job ${job.jobId} was not cancelled: ${JobState[job.state]} after ${job.completedSteps}/${steps} steps`,
    );
  }
  console.log(`cancelled ${job.jobId} at step ${job.completedSteps}/${steps}: ${JobState[job.state]}`);
}

type Orchestrator = ReturnType<typeof createOrchestratorClient>;

/** Runs `request`, cancels its job with CancelJob once the first step is done, and returns the job as
 * GetJob reports it once it has stopped. */
async function generateAndCancel(
  client: Orchestrator,
  request: MessageInitShape<typeof GenerateRequestSchema>,
): Promise<Job> {
  const call = new AbortController();
  const stop = () => call.abort();
  interrupt.signal.addEventListener("abort", stop);
  let jobId = "";
  let cancelled = false;
  try {
    // cancelOnDisconnect off: only CancelJob can stop this job, so a job that is not cancelled runs to the end.
    for await (const response of client.generate({ ...request, cancelOnDisconnect: false }, { signal: call.signal })) {
      const event = response.event;
      if (event.case === "accepted" || event.case === "step") {
        console.log(describe(response));
      }
      if (event.case === "accepted") {
        jobId = event.value.jobId;
      } else if (event.case === "step" && jobId && !cancelled) {
        const answer = await client.cancelJob({ name: `jobs/${jobId}` });
        cancelled = true;
        console.log(`cancel ${jobId}: ${JobState[answer.job?.state ?? JobState.UNSPECIFIED]}`);
      } else if (event.case === "result") {
        throw new Error(`job ${jobId} finished before it was cancelled; raise --cancel-steps`);
      }
    }
    throw new Error(`the stream of job ${jobId} ended without its CANCELLED status`);
  } catch (error) {
    if (interrupt.signal.aborted && jobId) {
      await client.cancelJob({ name: `jobs/${jobId}` }); // Ctrl-C: do not leave the job running
    }
    // The stream of a job cancelled by CancelJob ends with CANCELLED; anything else is a failure.
    if (!(cancelled && error instanceof ConnectError && error.code === Code.Canceled) || interrupt.signal.aborted) {
      throw error;
    }
    console.log(`stream of ${jobId} ended: ${describeError(error)}`);
  } finally {
    call.abort();
    interrupt.signal.removeEventListener("abort", stop);
  }
  if (!jobId) {
    throw new Error("the second job was never accepted");
  }
  // CancelJob answers once the job is marked cancelled; the stages stop at their next step. Wait (bounded)
  // until the job has stopped, so the state read is final.
  const deadline = Date.now() + 30_000;
  for (;;) {
    const { job } = await client.getJob({ name: `jobs/${jobId}` }, { signal: interrupt.signal });
    if (!job) {
      throw new Error(`GetJob returned no job for ${jobId}`);
    }
    if (job.state !== JobState.QUEUED && job.state !== JobState.RUNNING) {
      return job;
    }
    if (Date.now() > deadline) {
      throw new Error(`job ${jobId} still ${JobState[job.state]} 30 s after CancelJob`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

main().catch((error: unknown) => {
  if (interrupt.signal.aborted) {
    console.error("cancelled");
    process.exitCode = 130;
    return;
  }
  if (error instanceof UsageError) {
    console.error(`generate.js: ${error.message}\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  console.error(`generate.js: ${describeError(error)}`);
  process.exitCode = 1;
});
