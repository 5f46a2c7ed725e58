/* idx_bench.cu - k_idx_scores_t (the plain-numerics default) and k_idx_scores_mma (the FP4 default) against
 * k_idx_scores: the scores bit for bit (FP4-grid queries and keys whose block scales lie within 4
 * binades, so every kernel's sum is exact; half and f32 keys, ID 128 and 64, tokens on both sides of
 * topk, nothing written past Nc) and the time of each at 1M context; k_idx_topk against a host sort.
 * The kernels come from src/cuda/ops_compress.cu:
 *   sed -n "/^#define IDX_ROWS 64/,/^\/\* ---- the host launchers/p" src/cuda/ops_compress.cu | sed "\$d" > /tmp/k.inc
 *   nvcc -O3 -arch=sm_90a -I/tmp -Isrc dev/idx_bench.cu -o /tmp/idx_bench && /tmp/idx_bench
 * Prints one line per case (d = differing scores of tile / mma, w = scores written) and OK or BAD. */
#define M cudaMalloc
#define C cudaMemcpy
#define F cudaFree
#include <cstdio>
#define R cudaEventRecord
#define H cudaMemcpyHostToDevice
#define D cudaMemcpyDeviceToHost
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include "numerics_inl.h"
struct ds4_step{int pos0;};
enum { CU_ST_TOPK_SYNC = 4 };
__device__ __forceinline__ void cu_pdl_wait(){}
template <class T> __device__ __forceinline__ T cu_kvld(const T *p, bool) { return *p; }
__device__ __forceinline__ void cu_pdl_wait_only(){}
__device__ __forceinline__ void mm_mma(const unsigned (&a)[4], unsigned b0, unsigned b1, int (&c)[4]) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}
#include "k.inc"

/* An experiment, not in the engine: the scores from rows stored as their int8 codes (ID per row) and block
 * powers (ID/32 floats per row), as an emit could write them beside the f16 rows; one token (decode) only.
 * The mma and the head sums are k_idx_scores_mma's, so the same bits. */
__global__ void __launch_bounds__(256) k_idx_scores_mmc(const int8_t *qc, const float *qp, const float *wt,
    const int8_t *kc, const float *kp, int IH, int ID, int topk, int t, float sm_scale, float w_scale, float *scores,
    const ds4_step *step) {
    extern __shared__ __align__(16) unsigned char idxm_sm[];
    const idxm_sh m = idxm_layout(idxm_sm, ID);
    const int nb = ID / 32, tid = threadIdx.x;
    const int r0 = blockIdx.x * IDXM_KEYS, Nc = (step->pos0 + t + 1) / 4;
    if (Nc <= topk || r0 >= Nc) return;
    const int n16 = IDXM_KEYS * ID / 16; /* 16-byte pieces of the block's codes */
    uint4 u[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int i = tid + k * 256, kl = i / (ID / 16), c = i % (ID / 16);
        u[k] = i < n16 && r0 + kl < Nc ? *(const uint4 *)(kc + (int64_t)(r0 + kl) * ID + 16 * c) : make_uint4(0, 0, 0, 0);
    }
    float pv[2];
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int i = tid + k * 256, kl = i / nb;
        pv[k] = i < IDXM_KEYS * nb && r0 + kl < Nc ? kp[(int64_t)(r0 + kl) * nb + i % nb] : 0.0f;
    }
    idxm_stage_q(m, qc, qp, wt, IH, ID, w_scale, t);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int i = tid + k * 256, kl = i / (ID / 16), c = i % (ID / 16);
        if (i < n16) *(uint4 *)(m.kcs + kl * m.RS + 16 * c) = u[k];
    }
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int i = tid + k * 256;
        if (i < IDXM_KEYS * nb) m.kps[(i / nb) * 4 + i % nb] = pv[k];
    }
    __syncthreads();
    idxm_terms(m, IH, ID, sm_scale);
    __syncthreads();
    if (tid < IDXM_KEYS && r0 + tid < Nc) scores[r0 + tid] = idxm_sum<true>(m, IH, tid);
}
/* the codes and powers k_idx_scores_mma derives from each row (one thread per (row, block)) */
template <class T> __global__ void k_row_codes(const T *k, int n, int ID, int8_t *kc, float *kp) {
    const int nb = ID / 32, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * nb) return;
    float v[32], am = 0.0f;
    for (int j = 0; j < 32; j++) v[j] = (float)k[(int64_t)i * 32 + j], am = fmaxf(am, fabsf(v[j]));
    const float p = ds4_num_i4_pow(am), ip = ds4_num_i4_recip(p);
    for (int j = 0; j < 32; j++) kc[(int64_t)i * 32 + j] = (int8_t)ds4_num_i4_code_r(v[j], p, ip);
    kp[i] = p;
}
/* x[0..n) onto the FP4 grid: per block of 32 a scale 2^(-2..1), values code * scale */
static void fp4_grid(float *x,size_t n){static const float g[8]={0,.5f,1,1.5f,2,3,4,6};
for(size_t b=0;b<n;b+=32){float sc=ldexpf(1.f,(int)((b/32*7)%4)-2);for(size_t i=b;i<b+32&&i<n;i++){
int c=(int)((x[i]+1)*8)&7;x[i]=(x[i]<0?-g[c]:g[c])*sc;}}}
static uint32_t s=1;static float rnd(){s=s*1664525u+1013904223u;return ((s>>8)*(1.0f/16777216.0f))*2-1;}
template<class T> int test(int ID,int pos0,int nt,int topk,int reps){
const int IH=64;int Nmax=(pos0+nt)/4+1;int64_t ld=Nmax+7;
std::vector<float>q((size_t)nt*IH*ID),w((size_t)nt*IH);std::vector<T>k((size_t)Nmax*ID);
for(auto&x:q)x=rnd();for(auto&x:w)x=rnd();fp4_grid(q.data(),q.size());
{std::vector<float>kf(k.size());for(auto&x:kf)x=rnd();fp4_grid(kf.data(),kf.size());for(size_t i=0;i<k.size();i++)k[i]=(T)kf[i];}
const int nb=ID/32;std::vector<int8_t>qc(q.size());std::vector<float>qp(q.size()/32);
for(size_t b=0;b<q.size()/32;b++){float am=0;for(int i=0;i<32;i++)am=fmaxf(am,fabsf(q[32*b+i]));qp[b]=ds4_num_i4_pow(am);
for(int i=0;i<32;i++)qc[32*b+i]=(int8_t)ds4_num_i4_code(q[32*b+i],qp[b]);}
int8_t*dqc;float*dqp,*s3;M(&dqc,qc.size());M(&dqp,qp.size()*4);C(dqc,qc.data(),qc.size(),H);C(dqp,qp.data(),qp.size()*4,H);(void)nb;
float*dq,*dw,*s1,*s2;T*dk;ds4_step*st;ds4_step hs{pos0};
M(&dq,q.size()*4);M(&dw,w.size()*4);M(&dk,k.size()*sizeof(T));
size_t sb=(size_t)nt*ld*4;M(&s1,sb);M(&s2,sb);M(&s3,sb);M(&st,sizeof hs);cudaMemset(s3,0xAB,sb);float*s4;M(&s4,sb);cudaMemset(s4,0xAB,sb);
C(dq,q.data(),q.size()*4,H);C(dw,w.data(),w.size()*4,H);
C(dk,k.data(),k.size()*sizeof(T),H);C(st,&hs,sizeof hs,H);
cudaMemset(s1,0xAB,sb);cudaMemset(s2,0xAB,sb);
float sm=1.0f/sqrtf((float)ID),ws=1.0f/sqrtf(64.f);
size_t qsm=((size_t)IH*ID+16+(size_t)IDX_ROWS*(IH+1))*4, tsm=(size_t)ID*64*4+(size_t)ID*IDXT_ROWS*sizeof(T)+(size_t)IDXT_ROWS*65*4;
cudaFuncSetAttribute(k_idx_scores<T>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)qsm);
cudaFuncSetAttribute(k_idx_scores_t<T>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)tsm);
size_t msm=idxm_smem(ID);cudaFuncSetAttribute(k_idx_scores_mma<T>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)msm);
cudaFuncSetAttribute(k_idx_scores_mma<T,2>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)msm);float*s5;M(&s5,sb);cudaMemset(s5,0xAB,sb);
const int tpb=nt<=IDXM_TOK?1:IDXM_TOK;dim3 gm((Nmax+IDXM_KEYS-1)/IDXM_KEYS,(nt+tpb-1)/tpb);
dim3 gs((Nmax+IDX_ROWS-1)/IDX_ROWS,nt),gt((Nmax+IDXT_ROWS-1)/IDXT_ROWS,nt);
cudaEvent_t e0,e1,e2,e3;cudaEventCreate(&e0);cudaEventCreate(&e1);cudaEventCreate(&e2);cudaEventCreate(&e3);
k_idx_scores<T><<<gs,IDX_ROWS*4,qsm>>>(dq,dw,dk,IH,ID,topk,0,sm,ws,s1,ld,st);
k_idx_scores_t<T><<<gt,256,tsm>>>(dq,dw,dk,ID,topk,0,sm,ws,s2,ld,st);
k_idx_scores_mma<T><<<gm,256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,tpb,sm,ws,s3,ld,st);
k_idx_scores_mma<T><<<dim3(gm.x,nt),256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,0,sm,ws,s4,ld,st); /* tpb decided on the device */
k_idx_scores_mma<T,2><<<gm,256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,tpb,sm,ws,s5,ld,st); /* PP 2 */
cudaError_t er=cudaDeviceSynchronize();if(er){printf("err %s\n",cudaGetErrorString(er));return 1;}
std::vector<uint32_t>a(sb/4),b(sb/4),c3(sb/4);C(a.data(),s1,sb,D);C(b.data(),s2,sb,D);C(c3.data(),s3,sb,D);
long diff=0,diff3=0,wr=0;for(size_t i=0;i<a.size();i++){if(a[i]!=b[i])diff++;if(a[i]!=c3[i])diff3++;if(a[i]!=0xABABABABu)wr++;}
{std::vector<uint32_t>c4(sb/4);C(c4.data(),s4,sb,D);for(size_t i=0;i<c4.size();i++)if(c4[i]!=c3[i]){printf("tpb 0 differs at %zu\n",i);diff3++;break;}
C(c4.data(),s5,sb,D);for(size_t i=0;i<c4.size();i++)if(c4[i]!=c3[i]){printf("PP 2 differs at %zu\n",i);diff3++;break;}}
for(int i=0;i<reps;i++)k_idx_scores<T><<<gs,IDX_ROWS*4,qsm>>>(dq,dw,dk,IH,ID,topk,0,sm,ws,s1,ld,st); /* warm-up */
R(e0);for(int i=0;i<reps;i++)k_idx_scores<T><<<gs,IDX_ROWS*4,qsm>>>(dq,dw,dk,IH,ID,topk,0,sm,ws,s1,ld,st);
R(e1);for(int i=0;i<reps;i++)k_idx_scores_t<T><<<gt,256,tsm>>>(dq,dw,dk,ID,topk,0,sm,ws,s2,ld,st);
R(e2);for(int i=0;i<reps;i++)k_idx_scores_mma<T><<<gm,256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,tpb,sm,ws,s3,ld,st);
float mc=-1;if(nt==1&&IH==64){int8_t*kc;float*kp;M(&kc,(size_t)Nmax*ID);M(&kp,(size_t)Nmax*(ID/32)*4);
k_row_codes<T><<<(Nmax*(ID/32)+255)/256,256>>>(dk,Nmax,ID,kc,kp);float*s6;M(&s6,sb);cudaMemset(s6,0xAB,sb);
cudaFuncSetAttribute(k_idx_scores_mmc,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)msm);
k_idx_scores_mmc<<<gm.x,256,msm>>>(dqc,dqp,dw,kc,kp,IH,ID,topk,0,sm,ws,s6,st);cudaDeviceSynchronize();
{std::vector<uint32_t>c6(sb/4);C(c6.data(),s6,sb,D);for(size_t i=0;i<c6.size();i++)if(c6[i]!=c3[i]){printf("codes differ at %zu\n",i);diff3++;break;}}
cudaEvent_t f0,f1;cudaEventCreate(&f0);cudaEventCreate(&f1);R(f0);for(int i=0;i<reps;i++)k_idx_scores_mmc<<<gm.x,256,msm>>>(dqc,dqp,dw,kc,kp,IH,ID,topk,0,sm,ws,s6,st);
R(f1);cudaEventSynchronize(f1);cudaEventElapsedTime(&mc,f0,f1);mc/=reps;F(kc);F(kp);F(s6);}
R(e3);for(int i=0;i<reps;i++)k_idx_scores_mma<T,2><<<gm,256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,tpb,sm,ws,s5,ld,st);
cudaEvent_t e4,e5;cudaEventCreate(&e4);cudaEventCreate(&e5);R(e4);
/* PP 1 timed again after PP 2: the first timings may run while the clocks still ramp after the uploads */
for(int i=0;i<reps;i++)k_idx_scores_mma<T><<<gm,256,msm>>>(dqc,dqp,dw,dk,IH,ID,topk,0,nt,tpb,sm,ws,s3,ld,st);
R(e5);cudaEventSynchronize(e5);float m1,m2,m3,m4,m3b;cudaEventElapsedTime(&m1,e0,e1);cudaEventElapsedTime(&m2,e1,e2);cudaEventElapsedTime(&m3,e2,e3);cudaEventElapsedTime(&m4,e3,e4);cudaEventElapsedTime(&m3b,e4,e5);
double fl=0;for(int t=0;t<nt;t++){int Nc=(pos0+t+1)/4;if(Nc>topk)fl+=2.0*Nc*64*ID;}
printf("%s %d %d %d:d=%ld/%ld w=%ld|base %.3f ms %.2f TF|tile %.3f ms %.2f TF|mma %.3f ms %.2f TF|mma again %.3f|mma PP2 %.3f ms|codes %.3f ms\n",sizeof(T)==2?"h":"f",ID,pos0,nt,diff,diff3,wr,
m1/reps,fl/(m1/reps)/1e9,m2/reps,fl/(m2/reps)/1e9,m3/reps,fl/(m3/reps)/1e9,m3b/reps,m4/reps,mc);
F(dq);F(dw);F(dk);F(s1);F(s2);F(s3);F(s4);F(s5);F(st);F(dqc);F(dqp);return diff!=0||diff3!=0;}
/* k_idx_topk and k_idx_topk_wide (gw blocks per token) for nt tokens whose last one has Nc rows: their
 * selections against a host sort (score descending, ties to the lower index, then ascending indices) and
 * their times; scores drawn from few distinct values when ties */
static int test_topk(int Nc,int nt,int topk,bool ties,int reps){
int64_t ld=Nc+3;std::vector<float>sc((size_t)nt*ld);for(auto&x:sc){x=rnd();if(ties)x=roundf(x*8)/8;else x=x*0.01f+0.5f;}
float*ds;int32_t*dsel,*dn;unsigned*sy;int*dst;ds4_step*st;ds4_step hs{4*Nc-nt};
M(&ds,sc.size()*4);M(&dsel,(size_t)nt*topk*4);M(&dn,nt*4);M(&st,sizeof hs);M(&sy,4*TOPW_SYNC*4);M(&dst,4);
cudaMemset(sy,0,4*TOPW_SYNC*4);cudaMemset(dst,0,4);C(ds,sc.data(),sc.size()*4,H);C(st,&hs,sizeof hs,H);
int gw=(Nc+TOPW_CHUNK-1)/TOPW_CHUNK;if(gw>TOPW_MAX_BLOCKS/TOPW_MAX_TOKENS)gw=TOPW_MAX_BLOCKS/TOPW_MAX_TOKENS;
int kk=(Nc+gw-1)/gw;size_t wsm=(size_t)(kk>TOPW_CHUNK?kk:TOPW_CHUNK)*4;
cudaFuncSetAttribute(k_idx_topk_wide<1>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)wsm);cudaFuncSetAttribute(k_idx_topk_wide<8>,cudaFuncAttributeMaxDynamicSharedMemorySize,(int)wsm);
int diff[5]={0,0,0,0,0};float ms[5];
for(int v=0;v<5;v++){cudaMemset(dsel,0xff,(size_t)nt*topk*4);
auto go=[&]{if(v==1)k_idx_topk_wide<1><<<dim3(gw,nt),TOPW_THREADS,wsm>>>(ds,ld,topk,0,dsel,dn,sy,dst,st);else if(v==3)k_idx_topk_wide<8><<<dim3(gw,nt),TOPW_THREADS,wsm>>>(ds,ld,topk,0,dsel,dn,sy,dst,st);
else if(v==2)k_idx_topk<8><<<nt,1024>>>(ds,ld,topk,0,dsel,dn,st);else if(v==4)k_idx_topk<0><<<nt,1024>>>(ds,ld,topk,0,dsel,dn,st);
else k_idx_topk<1><<<nt,1024>>>(ds,ld,topk,0,dsel,dn,st);};
go();cudaError_t er=cudaDeviceSynchronize();if(er){printf("err %s\n",cudaGetErrorString(er));return 1;}
std::vector<int32_t>got((size_t)nt*topk),gn(nt);C(got.data(),dsel,got.size()*4,D);C(gn.data(),dn,nt*4,D);
for(int t=0;t<nt;t++){int n=(4*Nc-nt+t+1)/4;const float*row=sc.data()+(size_t)t*ld;int kq=n<topk?n:topk;
std::vector<int32_t>idx(n);for(int i=0;i<n;i++)idx[i]=i;
std::partial_sort(idx.begin(),idx.begin()+kq,idx.end(),[&](int a,int b){float x=row[a]==0?0.f:row[a],y=row[b]==0?0.f:row[b];return x>y||(x==y&&a<b);});
std::vector<int32_t>want(idx.begin(),idx.begin()+kq);std::sort(want.begin(),want.end());
diff[v]+=gn[t]!=kq;for(int i=0;i<kq;i++)diff[v]+=got[(size_t)t*topk+i]!=want[i];}
cudaEvent_t e0,e1;cudaEventCreate(&e0);cudaEventCreate(&e1);R(e0);for(int i=0;i<reps;i++)go();
R(e1);cudaEventSynchronize(e1);cudaEventElapsedTime(&ms[v],e0,e1);ms[v]/=reps;}
int hst=0;C(&hst,dst,4,D);
printf("topk Nc %d x%d k %d%s: d=%d/%d/%d/%d/%d status %d|one block %.3f ms, ilp %.3f, by rows %.3f|%d blocks %.3f ms, ilp %.3f\n",Nc,nt,topk,ties?" ties":"",diff[0],diff[1],diff[2],diff[3],diff[4],hst,ms[0],ms[2],ms[4],gw,ms[1],ms[3]);
F(ds);F(dsel);F(dn);F(st);F(sy);F(dst);return diff[0]||diff[1]||diff[2]||diff[3]||diff[4]||hst;}
int main(){int bad=0;
bad|=test_topk(262144,1,512,false,20);bad|=test_topk(262144,1,512,true,20);bad|=test_topk(262144,4,512,false,5);
bad|=test_topk(4097,4,512,true,20); /* tokens of 4,094-4,097 rows: the device choice (by rows) on both sides */
bad|=test_topk(16384,1,512,false,20);bad|=test_topk(16384,3,512,true,20);bad|=test_topk(5000,2,512,true,20);bad|=test_topk(4100,1,512,false,20);bad|=test_topk(600,1,512,true,5);
bad|=test<__half>(128,2048-3,37,512,2); bad|=test<float>(128,2048-3,37,512,2);
bad|=test<__half>(128,4*777+1,5,100,2); bad|=test<float>(64,4*777+1,5,100,2);
bad|=test<__half>(128,4*262144-1,1,512,20); bad|=test<float>(128,4*262144-1,1,512,20);
bad|=test<__half>(128,4*65536,16,512,5);
for(int nc:{1024,4096,16384,65536})bad|=test<__half>(128,4*nc-1,1,512,50);
printf(bad?"BAD\n":"OK\n");return bad;}
