// Times Generate from the TypeScript client inside one Node process, for bench/typescript_client.py: process
// start, module loading and the connection's setup (a first, untimed warm-up call) are left out, so what is
// timed is the client's own work per call. Plain JS over the compiled client (dist/, `npm run build`); not part
// of the package (tsconfig compiles src/ and examples/ only).
//
//   node clients/typescript/bench/generate_timing.js --address HOST:PORT --calls 5 --out last.png \
//       --prompt "a lighthouse at dusk" --seed 11 --steps 4 --width 64 --height 64
//
// stdout: one JSON object per timed call, {"call": i, "ms": wall milliseconds from the call to the end of its
// stream}, then {"warmup_ms": ..., "png_bytes": ..., "same_png": every call's PNG equal to the first's}; the last
// call's PNG is written to --out. Exit status 1 on any failure (its reason on stderr).
import { writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";

import { createOrchestratorClient, describeError } from "../dist/src/index.js";

const { values } = parseArgs({
  options: {
    address: { type: "string" },
    calls: { type: "string", default: "5" },
    out: { type: "string" },
    prompt: { type: "string", default: "a lighthouse at dusk" },
    seed: { type: "string", default: "11" },
    steps: { type: "string", default: "4" },
    width: { type: "string", default: "64" },
    height: { type: "string", default: "64" },
  },
});

async function main() {
  if (!values.address || !values.out) {
    throw new Error("--address and --out are required");
  }
  // The same request the example sends (examples/generate.ts), without its progress printing.
  const client = createOrchestratorClient({ address: values.address, timeoutMs: 300_000 });
  const request = {
    prompt: values.prompt,
    seed: BigInt(values.seed),
    numInferenceSteps: Number(values.steps),
    width: Number(values.width),
    height: Number(values.height),
    model: { name: "" },
    cancelOnDisconnect: true,
  };
  const generate = async () => {
    let png;
    for await (const response of client.generate(request)) {
      if (response.event.case === "result") {
        png = response.event.value.images[0]?.png;
      }
    }
    if (!png) {
      throw new Error("the stream ended without an image");
    }
    return png;
  };

  let started = performance.now();
  const first = await generate();
  const warmupMs = performance.now() - started;
  let last = first;
  let same = true;
  for (let call = 0; call < Number(values.calls); call++) {
    started = performance.now();
    last = await generate();
    const ms = performance.now() - started;
    console.log(JSON.stringify({ call, ms }));
    same &&= Buffer.from(last).equals(Buffer.from(first));
  }
  writeFileSync(values.out, last);
  console.log(JSON.stringify({ warmup_ms: warmupMs, png_bytes: last.length, same_png: same }));
}

main().catch((error) => {
  console.error(`generate_timing.js: ${describeError(error)}`);
  process.exitCode = 1;
});
