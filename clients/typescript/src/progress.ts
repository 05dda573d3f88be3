// Readable lines for Generate's (and WatchJob's) progress events, as the Python client's
// latentwire.client.progress.describe writes them.
import type { GenerateResponse } from "./gen/latentwire/orchestrator/v1/orchestrator_pb.js";

/** One readable line for a progress event, e.g. `step 12/20 3.1 s`. */
export function describe(response: GenerateResponse): string {
  const event = response.event;
  switch (event.case) {
    case "accepted":
      return `job ${event.value.jobId} accepted (seed ${event.value.seed})`;
    case "queued":
      return `queued: position ${event.value.position} of ${event.value.queueLength}`;
    case "modelLoading":
      return event.value.done
        ? `${event.value.stage} loaded ${event.value.model} in ${event.value.elapsedSeconds.toFixed(2)} s`
        : `${event.value.stage} loading ${event.value.model} ...`;
    case "textEncoded":
      return `text encoded in ${event.value.elapsedSeconds.toFixed(2)} s`;
    case "imageEncoded":
      return `init image encoded in ${event.value.elapsedSeconds.toFixed(2)} s`;
    case "step":
      return `step ${event.value.step}/${event.value.totalSteps} ${event.value.elapsedSeconds.toFixed(1)} s`;
    case "decoded":
      return `decoded in ${event.value.elapsedSeconds.toFixed(2)} s`;
    case "gridCell":
      return `grid cell ${(event.value.cell?.index ?? 0) + 1}/${event.value.cellCount}`;
    case "result": {
      const { images, seed, totalSeconds } = event.value;
      return `done: ${images.length} image(s), seed ${seed}, ${totalSeconds.toFixed(2)} s`;
    }
    default:
      return "unknown event";
  }
}
