/* One precision of the fused hex8 apply; included by hex8.c with REAL and SUF set.
 *
 * For one ghosted window of the nodal field (nodes -1 .. L, -1 .. ny, -1 .. nz of a
 * slab, window index = node + 1) and the Lame-mu field on its voxels -1 .. L-1
 * (window index = voxel + 1), adds sign * sum_e mu_e K0 u_e to the output nodes
 * [0, L) x [y0, y1) x [0, nz): every voxel's 24 x 24 product once per voxel that
 * touches an output row, vectorized over the 24 element rows, two voxels at a time
 * so each column of K0 is loaded once for both. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define VEC CAT(vec_, SUF)
#define NV ((int)(32 / sizeof(REAL)))     /* lanes of a 32-byte vector */
#define NACC (24 / NV)                    /* vectors per element vector */

typedef REAL VEC __attribute__((vector_size(32), aligned(32)));

typedef struct {
    const REAL *u; int64_t ub, uc, ux, uy, uz;     /* window (B, 3, L+2, ny+2, nz+2) */
    const REAL *mu; int64_t mx, my, mz;            /* voxels (L+1, ny+1, nz+1) */
    REAL *y; int64_t yb, yc, yx, yy, yz;           /* output (B, 3, L, ny, nz) */
    const REAL *K;                                  /* 24 x 24, symmetric, row-major */
    int64_t B, L, ny, nz, y0, y1;
    REAL sign;
    int assign;                                     /* 1: y = sign K u, else y += sign K u */
} CAT(job_, SUF);

static void *CAT(work_, SUF)(void *arg)
{
    const CAT(job_, SUF) *J = (const CAT(job_, SUF) *)arg;
    const int64_t nz = J->nz, L = J->L, y0 = J->y0, y1 = J->y1;
    VEC Kc[24][NACC];
    for (int j = 0; j < 24; ++j)
        for (int i = 0; i < NACC; ++i)
            for (int l = 0; l < NV; ++l)
                Kc[j][i][l] = J->K[24 * j + NV * i + l];
    /* four node rows (cx, cy) a voxel row feeds, nodes 0 .. nz+1 of the window, 3 comps,
       padded by 8 so the 6-wide adds of the last voxel stay inside */
    const int64_t rowlen = 3 * (nz + 2) + 8;
    REAL *obuf = (REAL *)aligned_alloc(64, ((4 * rowlen * sizeof(REAL)) + 63) / 64 * 64);
    if (!obuf) return (void *)1;

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
                memset(obuf, 0, 4 * rowlen * sizeof(REAL));
                const REAL *rp[4];
                for (int p = 0; p < 4; ++p)
                    rp[p] = J->u + b * J->ub + (wx + (p >> 1)) * J->ux + (wy + (p & 1)) * J->uy;
                const REAL *m = J->mu + wx * J->mx + wy * J->my;
                int64_t wz = 0;
                /* u_e - c with c a node value of the voxel (K0 c = 0, so K0 u_e is
                   unchanged): the products no longer carry the translation part of
                   u_e, whose cancellation cost digits and left white noise in K u that
                   the multigrid preconditioner amplifies (float32 PCG stalled near a
                   relative residual of 1e-5 at 128^3 without it). A pair shares c. */
                for (; wz + 1 <= nz; wz += 2) {            /* voxels wz, wz+1 */
                    REAL ue0[24], ue1[24], c[3];
                    for (int k = 0; k < 3; ++k) c[k] = rp[0][(wz + 1) * J->uz + k * J->uc];
                    for (int p = 0; p < 4; ++p)
                        for (int az = 0; az < 3; ++az)     /* nodes wz, wz+1, wz+2 */
                            for (int k = 0; k < 3; ++k) {
                                REAL v = rp[p][(wz + az) * J->uz + k * J->uc] - c[k];
                                if (az < 2) ue0[6 * p + 3 * az + k] = v;
                                if (az > 0) ue1[6 * p + 3 * (az - 1) + k] = v;
                            }
                    VEC a0[NACC], a1[NACC];
                    for (int i = 0; i < NACC; ++i) { a0[i] = (VEC){0}; a1[i] = (VEC){0}; }
                    for (int j = 0; j < 24; ++j) {
                        VEC s0 = (VEC){0} + ue0[j], s1 = (VEC){0} + ue1[j];
                        for (int i = 0; i < NACC; ++i) {
                            a0[i] += Kc[j][i] * s0;
                            a1[i] += Kc[j][i] * s1;
                        }
                    }
                    REAL f0[24] __attribute__((aligned(32))), f1[24] __attribute__((aligned(32)));
                    const REAL m0 = m[wz * J->mz], m1 = m[(wz + 1) * J->mz];
                    for (int i = 0; i < NACC; ++i) {
                        *(VEC *)(f0 + NV * i) = a0[i] * m0;
                        *(VEC *)(f1 + NV * i) = a1[i] * m1;
                    }

                    for (int p = 0; p < 4; ++p) {
                        REAL *o = obuf + p * rowlen + 3 * wz;
                        for (int q = 0; q < 6; ++q) o[q] += f0[6 * p + q];
                        for (int q = 0; q < 6; ++q) o[3 + q] += f1[6 * p + q];
                    }
                }
                for (; wz <= nz; ++wz) {                    /* the odd one left */
                    REAL ue0[24], c[3];
                    for (int k = 0; k < 3; ++k) c[k] = rp[0][wz * J->uz + k * J->uc];
                    for (int p = 0; p < 4; ++p)
                        for (int az = 0; az < 2; ++az)
                            for (int k = 0; k < 3; ++k)
                                ue0[6 * p + 3 * az + k] = rp[p][(wz + az) * J->uz + k * J->uc] - c[k];
                    VEC a0[NACC];
                    for (int i = 0; i < NACC; ++i) a0[i] = (VEC){0};
                    for (int j = 0; j < 24; ++j) {
                        VEC s0 = (VEC){0} + ue0[j];
                        for (int i = 0; i < NACC; ++i) a0[i] += Kc[j][i] * s0;
                    }
                    REAL f0[24] __attribute__((aligned(32)));
                    const REAL m0 = m[wz * J->mz];
                    for (int i = 0; i < NACC; ++i) *(VEC *)(f0 + NV * i) = a0[i] * m0;
                    for (int p = 0; p < 4; ++p) {
                        REAL *o = obuf + p * rowlen + 3 * wz;
                        for (int q = 0; q < 6; ++q) o[q] += f0[6 * p + q];
                    }
                }
                /* node rows (wx - 1 + cx, wy - 1 + cy), nodes z = 0 .. nz-1 (window 1 .. nz) */
                for (int p = 0; p < 4; ++p) {
                    const int64_t x = wx - 1 + (p >> 1), yy = wy - 1 + (p & 1);
                    if (x < 0 || x >= L || yy < y0 || yy >= y1) continue;
                    REAL *yr = J->y + b * J->yb + x * J->yx + yy * J->yy;
                    const REAL *o = obuf + p * rowlen + 3;
                    const REAL sg = J->sign;
                    if (J->yc == 1 && J->yz == 3) {
                        for (int64_t q = 0; q < 3 * nz; ++q) yr[q] += sg * o[q];
                    } else {
                        for (int64_t z = 0; z < nz; ++z)
                            for (int k = 0; k < 3; ++k) yr[z * J->yz + k * J->yc] += sg * o[3 * z + k];
                    }
                }
            }
        }
    }
    free(obuf);
    return NULL;
}

/* Entry point: the same job split over `threads` ranges of node rows y. Returns 0 on
   success. Strides in elements. */
int CAT(hex8_apply_, SUF)(const REAL *u, const int64_t *us, const REAL *mu, const int64_t *ms,
                          REAL *y, const int64_t *ys, const REAL *K,
                          int64_t B, int64_t L, int64_t ny, int64_t nz,
                          double sign, int assign, int threads)
{
    if (threads < 1) threads = 1;
    if (threads > ny) threads = (int)ny;
    if (threads > 64) threads = 64;
    CAT(job_, SUF) jobs[64];
    pthread_t tid[64];
    int rc = 0;
    for (int t = 0; t < threads; ++t) {
        CAT(job_, SUF) *J = &jobs[t];
        J->u = u; J->ub = us[0]; J->uc = us[1]; J->ux = us[2]; J->uy = us[3]; J->uz = us[4];
        J->mu = mu; J->mx = ms[0]; J->my = ms[1]; J->mz = ms[2];
        J->y = y; J->yb = ys[0]; J->yc = ys[1]; J->yx = ys[2]; J->yy = ys[3]; J->yz = ys[4];
        J->K = K; J->B = B; J->L = L; J->ny = ny; J->nz = nz;
        J->y0 = ny * t / threads; J->y1 = ny * (t + 1) / threads;
        J->sign = (REAL)sign; J->assign = assign;
    }
    for (int t = 1; t < threads; ++t)
        if (pthread_create(&tid[t], NULL, CAT(work_, SUF), &jobs[t]) != 0) return -1;
    if (CAT(work_, SUF)(&jobs[0]) != NULL) rc = -2;
    for (int t = 1; t < threads; ++t) {
        void *r = NULL;
        pthread_join(tid[t], &r);
        if (r != NULL) rc = -2;
    }
    return rc;
}

#undef VEC
#undef NV
#undef NACC
