// The peer for bench/gguf_vs_llamacpp.sh: llama.cpp through npm's node-llama-cpp (prebuilt CPU
// binaries). Reads jobs [{prompt_ids, n}] from a JSON file; for each, evaluates the prompt and
// samples n tokens greedily on 2 threads; prints [{ids, prefill_s, decode_s, rss_mb}] as JSON
// (rss_mb: the node process's resident memory after the job, llama.cpp's buffers included).
// A job {tokenize: TEXT} gives [{ids}]: llama.cpp's tokens for TEXT as plain text (no BOS, no
// special tokens parsed).
import fs from "node:fs";
import {getLlama} from "node-llama-cpp";

const [modelPath, jobsFile] = process.argv.slice(2);
const jobs = JSON.parse(fs.readFileSync(jobsFile, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const results = [];
for (const job of jobs) {
    if (job.tokenize !== undefined) {
        results.push({ids: Array.from(model.tokenize(job.tokenize, false))});
        continue;
    }
    // Flash attention off: the plain attention path is the closer match to chatforge's.
    const context = await model.createContext({contextSize: 2048, threads: 2, batchSize: 512, flashAttention: false});
    const sequence = context.getSequence();
    const ids = [];
    const start = performance.now();
    let first = null;
    for await (const token of sequence.evaluate(job.prompt_ids, {temperature: 0, yieldEogToken: true})) {
        if (first === null) first = performance.now();
        ids.push(token);
        if (ids.length >= job.n) break;
    }
    const end = performance.now();
    results.push({ids, prefill_s: (first - start) / 1000, decode_s: (end - first) / 1000,
                  rss_mb: process.memoryUsage().rss / 1048576});
    await context.dispose();
}
console.log(JSON.stringify(results));
await model.dispose();
await llama.dispose();
