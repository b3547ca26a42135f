// llama.cpp's logits for every position of a token sequence, for the GGUF fixtures
// (scripts/make_gguf_fixture.py builds and runs this): one batch through llama_decode with an
// f32 KV cache and flash attention off, every position's logits written as little-endian f32,
// row after row.
//
// Build: cc -O2 -o llamacpp_logits llamacpp_logits.c -I$LLAMA/include -I$LLAMA/ggml/include -L$BIN -lllama
// Run:   LD_LIBRARY_PATH=$BIN ./llamacpp_logits model.gguf out.bin 2,15,301,...
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s model.gguf out.bin id,id,...\n", argv[0]);
        return 2;
    }
    int capacity = 1, n = 0;
    for (const char * c = argv[3]; *c; c++) capacity += *c == ',';
    llama_token * tokens = malloc(sizeof(llama_token) * capacity);
    for (char * p = strtok(argv[3], ","); p; p = strtok(NULL, ",")) tokens[n++] = atoi(p);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 128;
    cp.n_batch = 128;
    cp.n_ubatch = 128;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx || n > 128) { fprintf(stderr, "cannot make a context for %d tokens\n", n); return 1; }

    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[2], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[2]); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), vocab, out);
    fclose(out);
    printf("%d positions x %d logits\n", n, vocab);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(tokens);
    return 0;
}
