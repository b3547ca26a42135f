// llama.cpp's logits for every position of a token sequence, for the GGUF fixtures
// (scripts/make_gguf_fixture.py builds and runs it; it needs only llama.h and libllama).
//
//   llamacpp_logits MODEL.gguf N_CTX OUT.bin TOKEN...
//
// Runs the tokens as one batch of one sequence into an empty F32 KV cache (flash attention off)
// and writes n_tokens x n_vocab little-endian f32 logits to OUT.bin.
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_CTX OUT.bin TOKEN...\n", argv[0]);
        return 2;
    }
    const int n_ctx = atoi(argv[2]);
    const int n_tokens = argc - 4;
    if (n_ctx < n_tokens) {
        fprintf(stderr, "N_CTX %d is shorter than the %d tokens\n", n_ctx, n_tokens);
        return 2;
    }
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; i++) {
        batch.token[i] = atoi(argv[4 + i]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    FILE * out = fopen(argv[3], "wb");
    if (!out) {
        fprintf(stderr, "cannot write %s\n", argv[3]);
        return 1;
    }
    for (int i = 0; i < n_tokens; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
            fprintf(stderr, "no logits for position %d\n", i);
            return 1;
        }
    }
    fclose(out);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
