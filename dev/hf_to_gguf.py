#!/usr/bin/env python3
"""dev/hf_to_gguf.py - stopgap HF (save_pretrained) -> F32 GGUF for engine
debugging, with gguf-py. The real converter is tools/convert (ds4-convert);
this exists only so the engine can be checked against the oracle fixtures
before it lands. Usage: .venv/bin/python dev/hf_to_gguf.py HF_DIR OUT.gguf
"""
import json, struct, sys
import numpy as np
import gguf

def load_st(path):
    f = open(path, 'rb'); n = struct.unpack('<Q', f.read(8))[0]
    hdr = json.loads(f.read(n)); base = 8 + n; data = open(path, 'rb').read()
    out = {}
    for k, v in hdr.items():
        if k == '__metadata__': continue
        a, b = v['data_offsets']; raw = data[base + a: base + b]; dt = v['dtype']
        if dt == 'BF16':
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == 'F32': x = np.frombuffer(raw, np.float32)
        elif dt == 'F16': x = np.frombuffer(raw, np.float16).astype(np.float32)
        elif dt == 'I64': x = np.frombuffer(raw, np.int64)
        else: raise SystemExit('dtype ' + dt)
        out[k] = x.reshape(v['shape'])
    return out

d, outp = sys.argv[1], sys.argv[2]
cfg = json.load(open(d + '/config.json')); st = load_st(d + '/model.safetensors')
L = cfg['num_hidden_layers']; rates = cfg['compress_rates']
ratios = [0 if t == 'sliding_attention' else rates[t] for t in cfg['layer_types']]
nhash = sum(1 for t in cfg['mlp_layer_types'] if t == 'hash_moe')
w = gguf.GGUFWriter(outp, 'deepseek4')
A = 'deepseek4.'
u32 = lambda k, v: w.add_uint32(A + k, int(v))
f32 = lambda k, v: w.add_float32(A + k, float(v))
u32('block_count', L); u32('embedding_length', cfg['hidden_size']); u32('vocab_size', cfg['vocab_size'])
u32('attention.head_count', cfg['num_attention_heads']); u32('attention.head_count_kv', 1)
u32('attention.key_length', cfg['head_dim']); u32('attention.value_length', cfg['head_dim'])
u32('rope.dimension_count', int(cfg['head_dim'] * cfg['partial_rotary_factor']))
u32('attention.q_lora_rank', cfg['q_lora_rank']); u32('attention.output_lora_rank', cfg['o_lora_rank'])
u32('attention.output_group_count', cfg['o_groups']); u32('expert_count', cfg['n_routed_experts'])
u32('expert_used_count', cfg['num_experts_per_tok']); u32('expert_feed_forward_length', cfg['moe_intermediate_size'])
u32('expert_shared_count', 1); u32('hash_layer_count', nhash); u32('attention.sliding_window', cfg['sliding_window'])
u32('attention.indexer.head_count', cfg['index_n_heads']); u32('attention.indexer.key_length', cfg['index_head_dim'])
u32('attention.indexer.top_k', cfg['index_topk']); u32('hyper_connection.count', cfg['hc_mult'])
u32('hyper_connection.sinkhorn_iterations', cfg['hc_sinkhorn_iters']); f32('hyper_connection.epsilon', cfg['hc_eps'])
f32('attention.layer_norm_rms_epsilon', cfg['rms_norm_eps'])
w.add_array(A + 'attention.compress_ratios', [int(r) for r in ratios])
w.add_array(A + 'swiglu_clamp_exp', [float(cfg['swiglu_limit'])] * L)
f32('rope.freq_base', cfg['rope_theta']); f32('attention.compress_rope_freq_base', cfg['compress_rope_theta'])
comp = cfg.get('rope_parameters', {}).get('compress', {})
if comp.get('rope_type') == 'yarn':
    w.add_string(A + 'rope.scaling.type', 'yarn'); f32('rope.scaling.factor', comp['factor'])
    u32('rope.scaling.original_context_length', comp['original_max_position_embeddings'])
    f32('rope.scaling.yarn_beta_fast', comp['beta_fast']); f32('rope.scaling.yarn_beta_slow', comp['beta_slow'])
else:
    w.add_string(A + 'rope.scaling.type', 'none')
f32('expert_weights_scale', cfg['routed_scaling_factor']); w.add_bool(A + 'expert_weights_norm', True)

def put(name, arr):
    arr = np.ascontiguousarray(arr)
    w.add_tensor(name, arr.astype(np.int32) if arr.dtype == np.int64 else arr.astype(np.float32))

put('token_embd.weight', st['model.embed_tokens.weight']); put('output.weight', st['head.weight'])
put('output_norm.weight', st['model.norm.weight']); put('output_hc_fn.weight', st['model.hc_head.hc_fn'])
put('output_hc_base.weight', st['model.hc_head.hc_base']); put('output_hc_scale.weight', st['model.hc_head.hc_scale'])
for il in range(L):
    p = 'model.layers.%d.' % il; b = 'blk.%d.' % il
    m = {'hc_attn_fn.weight': 'hc_attn_fn', 'hc_attn_scale.weight': 'hc_attn_scale', 'hc_attn_base.weight': 'hc_attn_base',
         'hc_ffn_fn.weight': 'hc_ffn_fn', 'hc_ffn_scale.weight': 'hc_ffn_scale', 'hc_ffn_base.weight': 'hc_ffn_base',
         'attn_norm.weight': 'attn_norm.weight', 'ffn_norm.weight': 'ffn_norm.weight',
         'attn_q_a.weight': 'attn.wq_a.weight', 'attn_q_a_norm.weight': 'attn.q_norm.weight',
         'attn_q_b.weight': 'attn.wq_b.weight', 'attn_kv.weight': 'attn.wkv.weight',
         'attn_kv_a_norm.weight': 'attn.norm.weight', 'attn_sinks.weight': 'attn.attn_sink',
         'attn_output_a.weight': 'attn.wo_a.weight', 'attn_output_b.weight': 'attn.wo_b.weight',
         'attn_compressor_ape.weight': 'attn.compressor.ape', 'attn_compressor_kv.weight': 'attn.compressor.wkv.weight',
         'attn_compressor_gate.weight': 'attn.compressor.wgate.weight', 'attn_compressor_norm.weight': 'attn.compressor.norm.weight',
         'indexer.attn_q_b.weight': 'attn.indexer.wq_b.weight', 'indexer.proj.weight': 'attn.indexer.weights_proj.weight',
         'indexer_compressor_ape.weight': 'attn.indexer.compressor.ape', 'indexer_compressor_kv.weight': 'attn.indexer.compressor.wkv.weight',
         'indexer_compressor_gate.weight': 'attn.indexer.compressor.wgate.weight', 'indexer_compressor_norm.weight': 'attn.indexer.compressor.norm.weight',
         'ffn_gate_inp.weight': 'ffn.gate.weight', 'exp_probs_b.bias': 'ffn.gate.bias', 'ffn_gate_tid2eid.weight': 'ffn.gate.tid2eid',
         'ffn_gate_shexp.weight': 'ffn.shared_experts.w1.weight', 'ffn_up_shexp.weight': 'ffn.shared_experts.w3.weight',
         'ffn_down_shexp.weight': 'ffn.shared_experts.w2.weight'}
    for g, h in m.items():
        if p + h in st: put(b + g, st[p + h])
    E = cfg['n_routed_experts']
    for g, h in (('ffn_gate_exps.weight', 'w1'), ('ffn_up_exps.weight', 'w3'), ('ffn_down_exps.weight', 'w2')):
        put(b + g, np.stack([st[p + 'ffn.experts.%d.%s.weight' % (e, h)] for e in range(E)]))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
