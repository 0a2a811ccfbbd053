/* One precision of the fused hex8 apply; included by hex8.c with REAL and SUF set.
 *
 * Fine level (hex8_apply_*): for one ghosted window of the nodal field (nodes -1 .. L,
 * -1 .. ny, -1 .. nz of a slab, window index = node + 1) and the Lame-mu field on its
 * voxels -1 .. L-1 (window index = voxel + 1), adds sign * sum_e mu_e K0 u_e to the
 * output nodes [0, L) x [y0, y1) x [0, nz) (gather form: every output node's eight
 * voxels are in the window, nothing is folded back).
 *
 * u_e - c with c the voxel's corner-0 value is multiplied (K0 c = 0, so K0 u_e is
 * unchanged): the products no longer carry the translation part of u_e, whose
 * cancellation cost digits and left white noise in K u that the multigrid
 * preconditioner amplifies (float32 PCG stalled near a relative residual of 1e-5 at
 * 128^3 without it); the three entries of corner 0 are then zero, so the products
 * use 21 of the 24 columns. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define VEC CAT(vec_, SUF)
#define NV ((int)(32 / sizeof(REAL)))     /* lanes of a 32-byte vector */
#define NACC (24 / NV)                    /* vectors per element vector (coarse kernel) */

typedef REAL VEC __attribute__((vector_size(32), aligned(32)));

typedef struct {
    const REAL *u; int64_t ub, uc, ux, uy, uz;     /* window (B, 3, L+2, ny+2, nz+2) */
    const REAL *mu; int64_t mx, my, mz;            /* voxels (L+1, ny+1, nz+1) */
    REAL *y; int64_t yb, yc, yx, yy, yz;           /* output (B, 3, L, ny, nz) */
    const REAL *K;                                  /* 24 x 24, symmetric, row-major */
    int64_t B, L, ny, nz, y0, y1;
    REAL sign;
    int assign;                                     /* 1: y = sign K u, else y += sign K u */
    int zwrap;                                      /* z not split: window z is periodic */
} CAT(job_, SUF);

/* One thread's node rows [y0, y1), the voxels of a row in the SIMD lanes (NV
 * consecutive voxels along z per vector). The four node rows a voxel row touches are
 * first copied into component-major scratch rows (zero-padded), so the 21 used
 * columns of u_e - u_corner0 for NV voxels are 21 unaligned vector loads. Two blocks
 * of NV voxels share each broadcast K0[i][j]: four output rows i at a time, eight
 * accumulators in registers. The results scale by mu (NV voxels a vector) and add
 * into component-major node-row sums with unaligned vector adds, which are then
 * added into the output rows. Voxels past the row's end (spare lanes and blocks)
 * read zero u and zero mu and add only to nodes that are not kept. On the project's
 * 2-core EPYC VM: ~35 Mvoxel-cases/s on one thread (the kernel alone, 128^3, six
 * cases), ~1.4x the first version (one voxel at a time, SIMD over the 24 rows). */
static void *CAT(work_, SUF)(void *arg)
{
    const CAT(job_, SUF) *J = (const CAT(job_, SUF) *)arg;
    const int64_t nz = J->nz, L = J->L, y0 = J->y0, y1 = J->y1;
    /* zwrap (the window's z extent is the whole periodic axis): the nz voxels 0 ..
       nz-1 only, and the contribution to node nz folded onto node 0; voxel -1 is then
       voxel nz-1 and need not be made again. Otherwise the nz + 1 voxels -1 .. nz-1. */
    const int64_t zs = J->zwrap ? 1 : 0, nvox = J->zwrap ? nz : nz + 1, nblk = (nvox + NV - 1) / NV;
    const int64_t rl = (nblk + 1) * NV + NV + 8;     /* scratch row length (nodes), padded */
    VEC (*Kb)[24] = (VEC (*)[24])aligned_alloc(64, sizeof(VEC) * 24 * 24);
    REAL *buf = (REAL *)aligned_alloc(64, (((2 * 12 + 1) * rl * sizeof(REAL)) + 63) / 64 * 64);
    if (!Kb || !buf) { free(Kb); free(buf); return (void *)1; }
    for (int i = 0; i < 24; ++i)
        for (int j = 0; j < 24; ++j)
            Kb[i][j] = (VEC){0} + J->K[24 * i + j];
    REAL *su = buf;                /* su[(p * 3 + k) * rl + node]: u of node rows p */
    REAL *so = buf + 12 * rl;      /* so[(p * 3 + k) * rl + node]: sums for node rows p */
    REAL *sm = buf + 24 * rl;      /* mu of the voxel row */
    memset(buf, 0, (2 * 12 + 1) * rl * sizeof(REAL));
    typedef REAL VU __attribute__((vector_size(32), aligned(sizeof(REAL))));

    for (int64_t b = 0; b < J->B; ++b) {
        if (J->assign)
            for (int64_t x = 0; x < L; ++x)
                for (int64_t yy = y0; yy < y1; ++yy) {
                    REAL *yr = J->y + b * J->yb + x * J->yx + yy * J->yy;
                    for (int64_t z = 0; z < nz; ++z)
                        for (int k = 0; k < 3; ++k) yr[z * J->yz + k * J->yc] = 0;
                }
        for (int64_t wx = 0; wx <= L; ++wx) {
            for (int64_t wy = y0; wy <= y1; ++wy) {
                for (int p = 0; p < 4; ++p) {
                    const REAL *r = J->u + b * J->ub + (wx + (p >> 1)) * J->ux + (wy + (p & 1)) * J->uy;
                    REAL *d0 = su + (3 * p) * rl, *d1 = d0 + rl, *d2 = d1 + rl;
                    if (J->uz == 3 && J->uc == 1) {
                        for (int64_t z = 0; z < nz + 2; ++z) {
                            d0[z] = r[3 * z]; d1[z] = r[3 * z + 1]; d2[z] = r[3 * z + 2];
                        }
                    } else {
                        for (int64_t z = 0; z < nz + 2; ++z) {
                            d0[z] = r[z * J->uz]; d1[z] = r[z * J->uz + J->uc]; d2[z] = r[z * J->uz + 2 * J->uc];
                        }
                    }
                }
                {
                    const REAL *m = J->mu + wx * J->mx + wy * J->my;
                    for (int64_t z = 0; z < nvox; ++z) sm[z] = m[(z + zs) * J->mz];
                }
                memset(so, 0, 12 * rl * sizeof(REAL));
                const REAL *suz = su + zs;
                REAL *soz = so + zs;
                for (int64_t blk = 0; blk < nblk; blk += 2) {      /* two blocks of NV voxels */
                    const int64_t z0 = blk * NV, z1 = z0 + NV;           /* (the second may be spare) */
                    VEC ue[2][24];
                    VEC mv[2];
                    for (int h = 0; h < 2; ++h) {
                        const int64_t zb = h ? z1 : z0;
                        const VEC c0 = *(const VU *)(suz + 0 * rl + zb);
                        const VEC c1 = *(const VU *)(suz + 1 * rl + zb);
                        const VEC c2 = *(const VU *)(suz + 2 * rl + zb);
                        for (int a = 1; a < 8; ++a) {          /* dof 3a + k: corner a = (p, az) */
                            const int p = a >> 1, az = a & 1;
                            ue[h][3 * a + 0] = *(const VU *)(suz + (3 * p + 0) * rl + zb + az) - c0;
                            ue[h][3 * a + 1] = *(const VU *)(suz + (3 * p + 1) * rl + zb + az) - c1;
                            ue[h][3 * a + 2] = *(const VU *)(suz + (3 * p + 2) * rl + zb + az) - c2;
                        }
                        mv[h] = *(const VU *)(sm + zb) * J->sign;
                    }
                    for (int g = 0; g < 6; ++g) {                  /* four rows of K0, both blocks */
                        VEC acc0[4], acc1[4];
                        for (int ii = 0; ii < 4; ++ii) { acc0[ii] = (VEC){0}; acc1[ii] = (VEC){0}; }
                        for (int j = 3; j < 24; ++j) {
                            const VEC u0 = ue[0][j], u1 = ue[1][j];
                            for (int ii = 0; ii < 4; ++ii) {
                                const VEC kk = Kb[4 * g + ii][j];
                                acc0[ii] += kk * u0;
                                acc1[ii] += kk * u1;
                            }
                        }
                        for (int ii = 0; ii < 4; ++ii) {
                            const int i = 4 * g + ii, a = i / 3, k = i % 3, p = a >> 1, az = a & 1;
                            VU *o = (VU *)(soz + (3 * p + k) * rl + z0 + az);
                            *o = *o + acc0[ii] * mv[0];
                            VU *o1 = (VU *)(soz + (3 * p + k) * rl + z1 + az);
                            *o1 = *o1 + acc1[ii] * mv[1];
                        }
                    }
                }
                if (J->zwrap)                               /* node nz is node 0 */
                    for (int r = 0; r < 12; ++r) so[r * rl + 1] += so[r * rl + nz + 1];
                /* node rows (wx - 1 + cx, wy - 1 + cy), nodes z = 0 .. nz-1 (window 1 .. nz) */
                for (int p = 0; p < 4; ++p) {
                    const int64_t x = wx - 1 + (p >> 1), yy = wy - 1 + (p & 1);
                    if (x < 0 || x >= L || yy < y0 || yy >= y1) continue;
                    REAL *yr = J->y + b * J->yb + x * J->yx + yy * J->yy;
                    const REAL *o0 = so + (3 * p) * rl + 1, *o1 = o0 + rl, *o2 = o1 + rl;
                    if (J->yc == 1 && J->yz == 3) {
                        for (int64_t z = 0; z < nz; ++z) {
                            yr[3 * z] += o0[z]; yr[3 * z + 1] += o1[z]; yr[3 * z + 2] += o2[z];
                        }
                    } else {
                        for (int64_t z = 0; z < nz; ++z) {
                            yr[z * J->yz] += o0[z]; yr[z * J->yz + J->yc] += o1[z]; yr[z * J->yz + 2 * J->yc] += o2[z];
                        }
                    }
                }
            }
        }
    }
    free(Kb);
    free(buf);
    return NULL;
}

/* Entry point: the same job split over `threads` ranges of node rows y. Returns 0 on
   success. Strides in elements. */
int CAT(hex8_apply_, SUF)(const REAL *u, const int64_t *us, const REAL *mu, const int64_t *ms,
                          REAL *y, const int64_t *ys, const REAL *K,
                          int64_t B, int64_t L, int64_t ny, int64_t nz,
                          double sign, int assign, int zwrap, int threads)
{
    if (threads < 1) threads = 1;
    if (threads > ny) threads = (int)ny;
    CAT(job_, SUF) base;
    base.u = u; base.ub = us[0]; base.uc = us[1]; base.ux = us[2]; base.uy = us[3]; base.uz = us[4];
    base.mu = mu; base.mx = ms[0]; base.my = ms[1]; base.mz = ms[2];
    base.y = y; base.yb = ys[0]; base.yc = ys[1]; base.yx = ys[2]; base.yy = ys[3]; base.yz = ys[4];
    base.K = K; base.B = B; base.L = L; base.ny = ny; base.nz = nz;
    base.sign = (REAL)sign; base.assign = assign; base.zwrap = zwrap;
    int rc = 0;
    /* OpenMP, so the threads are PyTorch's own pool (the library links libgomp.so.1,
       which the loader resolves to the copy torch already loaded): with threads of our
       own, torch's workers still spinning after its last parallel op took the cores
       (a 32^3 six-case apply on 2 threads: 13 ms instead of 6). */
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        CAT(job_, SUF) J = base;
        J.y0 = ny * t / nt; J.y1 = ny * (t + 1) / nt;
        if (CAT(work_, SUF)(&J) != NULL) {
            #pragma omp atomic write
            rc = -2;
        }
    }
    return rc;
}


/* ---- coarse levels: a 24 x 24 matrix per voxel, scatter form ----------------------
 * u: the owned nodes with one high ghost layer (B, 3, lx+1, ly+1, lz+1); y: the same
 * shape, every node written (assign), the high layer holding what its periodic (or
 * other rank's) owner must add (Domain.accumulate folds it). Voxel w feeds nodes
 * w + c. The threads own ranges of node rows y. Per voxel, the matrix is
 *   mode 1 (GalerkinCoefficientOperator, one Poisson ratio): w_0 S_kind where all 8
 *          children's weights are equal, else sum_j w_j B_kind,j (8 products);
 *   mode 2 (ElementMatrixOperator): shared[code] where code >= 0, else km[row].
 * Where every such matrix annihilates translations (``center``: Galerkin matrices
 * do), u_E - (a node value) is used, as in the fine kernel. */
typedef REAL CAT(vecu_, SUF) __attribute__((vector_size(32), aligned(sizeof(REAL))));

typedef struct {
    const REAL *u; int64_t ub, uc, ux, uy, uz;
    REAL *y; int64_t yb, yc, yx, yy, yz;
    int64_t B, lx, ly, lz, y0, y1;
    int mode, center;
    const REAL *coef; const uint8_t *kind; const REAL *bases; const REAL *sums;
    const int16_t *code; const int32_t *row; const REAL *shared; const REAL *km;
} CAT(cjob_, SUF);

static inline void CAT(matvec_, SUF)(VEC acc[NACC], const REAL *M, const REAL *ue, REAL scale, int j0)
{
    for (int j = j0; j < 24; ++j) {
        VEC s = (VEC){0} + ue[j] * scale;
        for (int i = 0; i < NACC; ++i)
            acc[i] += *(const CAT(vecu_, SUF) *)(M + 24 * j + NV * i) * s;
    }
}

static void *CAT(cwork_, SUF)(void *arg)
{
    const CAT(cjob_, SUF) *J = (const CAT(cjob_, SUF) *)arg;
    const int64_t lx = J->lx, ly = J->ly, lz = J->lz, y0 = J->y0, y1 = J->y1;
    const int64_t rowlen = 3 * (lz + 1) + 8;
    const int j0 = J->center ? 3 : 0;           /* centred on corner 0: its columns meet zeros */
    REAL *obuf = (REAL *)aligned_alloc(64, ((4 * rowlen * sizeof(REAL)) + 63) / 64 * 64);
    if (!obuf) return (void *)1;
    for (int64_t b = 0; b < J->B; ++b) {
        for (int64_t x = 0; x <= lx; ++x)                   /* assign: zero own rows */
            for (int64_t yy = y0; yy < y1; ++yy) {
                REAL *yr = J->y + b * J->yb + x * J->yx + yy * J->yy;
                for (int64_t z = 0; z <= lz; ++z)
                    for (int k = 0; k < 3; ++k) yr[z * J->yz + k * J->yc] = 0;
            }
        const int64_t wy0 = y0 > 0 ? y0 - 1 : 0, wy1 = y1 < ly ? y1 : ly;
        for (int64_t wx = 0; wx < lx; ++wx) {
            for (int64_t wy = wy0; wy < wy1; ++wy) {
                memset(obuf, 0, 4 * rowlen * sizeof(REAL));
                const REAL *rp[4];
                for (int p = 0; p < 4; ++p)
                    rp[p] = J->u + b * J->ub + (wx + (p >> 1)) * J->ux + (wy + (p & 1)) * J->uy;
                const int64_t v0 = (wx * ly + wy) * lz;       /* voxel index of (wx, wy, 0) */
                for (int64_t wz = 0; wz < lz; ++wz) {
                    const int64_t v = v0 + wz;
                    REAL ue[24], c[3];
                    for (int k = 0; k < 3; ++k) c[k] = J->center ? rp[0][wz * J->uz + k * J->uc] : 0;
                    for (int p = 0; p < 4; ++p)
                        for (int az = 0; az < 2; ++az)
                            for (int k = 0; k < 3; ++k)
                                ue[6 * p + 3 * az + k] = rp[p][(wz + az) * J->uz + k * J->uc] - c[k];
                    VEC acc[NACC];
                    for (int i = 0; i < NACC; ++i) acc[i] = (VEC){0};
                    if (J->mode == 1) {
                        const REAL *w = J->coef + 8 * v;
                        const int kd = J->kind[v];
                        int uni = 1;
                        for (int j = 1; j < 8; ++j) uni &= (w[j] == w[0]);
                        if (uni) {
                            CAT(matvec_, SUF)(acc, J->sums + 576 * kd, ue, w[0], j0);
                        } else {
                            const REAL *Bk = J->bases + 8 * 576 * kd;
                            for (int j = 0; j < 8; ++j)
                                if (w[j] != 0) CAT(matvec_, SUF)(acc, Bk + 576 * j, ue, w[j], j0);
                        }
                    } else {
                        const int cd = J->code[v];
                        const REAL *M = cd >= 0 ? J->shared + 576 * cd : J->km + 576 * (int64_t)J->row[v];
                        CAT(matvec_, SUF)(acc, M, ue, 1, j0);
                    }
                    REAL f[24] __attribute__((aligned(32)));
                    for (int i = 0; i < NACC; ++i) *(VEC *)(f + NV * i) = acc[i];
                    for (int p = 0; p < 4; ++p) {
                        REAL *o = obuf + p * rowlen + 3 * wz;
                        for (int q = 0; q < 6; ++q) o[q] += f[6 * p + q];
                    }
                }
                for (int p = 0; p < 4; ++p) {               /* node rows (wx + cx, wy + cy) */
                    const int64_t x = wx + (p >> 1), yy = wy + (p & 1);
                    if (yy < y0 || yy >= y1) continue;
                    REAL *yr = J->y + b * J->yb + x * J->yx + yy * J->yy;
                    const REAL *o = obuf + p * rowlen;
                    if (J->yc == 1 && J->yz == 3) {
                        for (int64_t q = 0; q < 3 * (lz + 1); ++q) yr[q] += o[q];
                    } else {
                        for (int64_t z = 0; z <= lz; ++z)
                            for (int k = 0; k < 3; ++k) yr[z * J->yz + k * J->yc] += o[3 * z + k];
                    }
                }
            }
        }
    }
    free(obuf);
    return NULL;
}

int CAT(hex8_coarse_apply_, SUF)(const REAL *u, const int64_t *us, REAL *y, const int64_t *ys,
                                 int64_t B, int64_t lx, int64_t ly, int64_t lz, int mode, int center,
                                 const REAL *coef, const uint8_t *kind, const REAL *bases, const REAL *sums,
                                 const int16_t *code, const int32_t *row, const REAL *shared, const REAL *km,
                                 int threads)
{
    if (threads < 1) threads = 1;
    if (threads > ly + 1) threads = (int)(ly + 1);
    CAT(cjob_, SUF) base;
    base.u = u; base.ub = us[0]; base.uc = us[1]; base.ux = us[2]; base.uy = us[3]; base.uz = us[4];
    base.y = y; base.yb = ys[0]; base.yc = ys[1]; base.yx = ys[2]; base.yy = ys[3]; base.yz = ys[4];
    base.B = B; base.lx = lx; base.ly = ly; base.lz = lz; base.mode = mode; base.center = center;
    base.coef = coef; base.kind = kind; base.bases = bases; base.sums = sums;
    base.code = code; base.row = row; base.shared = shared; base.km = km;
    int rc = 0;
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        CAT(cjob_, SUF) J = base;
        J.y0 = (ly + 1) * t / nt; J.y1 = (ly + 1) * (t + 1) / nt;
        if (CAT(cwork_, SUF)(&J) != NULL) {
            #pragma omp atomic write
            rc = -2;
        }
    }
    return rc;
}

#undef VEC
#undef NV
#undef NACC
